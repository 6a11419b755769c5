"""What several test files share."""


def one_line_error(capsys, rc: int, *needles: str) -> str:
    """The command failed with exit code 2 and one line on stderr holding every needle."""
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err
