"""What the command line's help needs to know about the models, without importing torch.

``--help`` and a mistyped flag answer at once, instead of after the 3-5 s that importing torch
and the model zoo takes. The figures here are copies: ``tests/test_new_user_help.py`` checks
them against the models (``models.MODELS``: order, flags and their defaults, recipes) and the
constants they mirror, so a change there that is not made here fails the tests.
"""

from __future__ import annotations

DEFAULT = "mlp"
SEED = 2147483647  # the lecture's seed; makemore's models use their own 3407
MAKEMORE_SEED = 3407
ADAMW = {"steps": 20_000, "batch_size": 32, "lr": 5e-4, "lr_decay_step": 20_000,
         "lr_decay_to": 5e-5, "seed": MAKEMORE_SEED, "optimizer": "adamw", "weight_decay": 0.01,
         "warmup_steps": 0, "lr_schedule": "cosine"}
SEQUENCE_FLAGS = {"block_size": 0, "n_embd": 64, "n_embd2": 64}

# type -> (model flags with their defaults, training recipe), in the zoo's order
MODELS: dict[str, tuple[dict[str, int], dict[str, object]]] = {
    "bigram": ({}, {"steps": 20_000, "batch_size": 256, "lr": 30.0, "lr_decay_step": 15_000,
                    "lr_decay_to": 3.0, "seed": SEED}),
    "mlp": ({"block_size": 3, "n_embd": 10, "n_hidden": 200},
            {"steps": 200_000, "batch_size": 32, "lr": 0.1, "lr_decay_step": 100_000,
             "lr_decay_to": 0.01, "seed": SEED}),
    "wavenet": ({"block_size": 8, "n_embd": 24, "n_hidden": 128},
                {"steps": 200_000, "batch_size": 32, "lr": 0.1, "lr_decay_step": 150_000,
                 "lr_decay_to": 0.01, "seed": SEED}),
    "rnn": (SEQUENCE_FLAGS, ADAMW),
    "gru": (SEQUENCE_FLAGS, ADAMW),
    "bow": (SEQUENCE_FLAGS, ADAMW),
    "transformer": ({"block_size": 0, "n_layer": 4, "n_head": 4, "n_embd": 64},
                    {"steps": 40_000, "batch_size": 32, "lr": 2e-3, "lr_decay_step": 40_000,
                     "lr_decay_to": 1e-4, "seed": MAKEMORE_SEED, "optimizer": "adamw",
                     "weight_decay": 0.2, "warmup_steps": 1000, "lr_schedule": "cosine",
                     "dropout": 0.2, "ema": 0.9995, "sam": 0.05}),
}
# TrainConfig's defaults for what a recipe leaves out
TRAIN_DEFAULTS = {"optimizer": "sgd", "weight_decay": 0.0, "warmup_steps": 0,
                  "lr_schedule": "step", "dropout": 0.0, "ema": 0.0, "sam": 0.0}
DISTILL_DEFAULT = 0.5      # training.distill.DEFAULT_WEIGHT
CHECK_TIME_LIMIT_S = 60.0  # learning.sandbox.TIME_LIMIT_S
GROUP_TIMEOUT_S = 60.0     # training.distributed.DEFAULT_TIMEOUT
# model types whose block size 0 means "the longest item + 1, from the data"
SEQUENCE_MODELS = ("rnn", "gru", "bow", "transformer")


def types() -> str:
    return ", ".join(MODELS)


def recipe(name: str) -> dict[str, object]:
    """A type's whole recipe: its own fields over TrainConfig's defaults."""
    return {**TRAIN_DEFAULTS, **MODELS[name][1]}


def model_flags() -> dict[str, list[str]]:
    """Each model flag of any type -> the types that have it."""
    out: dict[str, list[str]] = {}
    for name, (flags, _) in MODELS.items():
        for flag in flags:
            out.setdefault(flag, []).append(name)
    return out


def recipe_table() -> str:
    """Each type's recipe, one row per type, for the help's epilog."""
    rows = [("type", "steps", "optimizer", "batch", "lr", "schedule", "warm-up", "weight decay",
             "other")]
    for name in MODELS:
        r = recipe(name)
        schedule = (f"{r['lr_decay_to']:g} from {r['lr_decay_step']:,}" if r["lr_schedule"] == "step"
                    else f"cosine to {r['lr_decay_to']:g} at {r['lr_decay_step']:,}")
        other = ", ".join(f"{k} {r[k]:g}" for k in ("dropout", "ema", "sam") if r[k]) or "-"
        rows.append((name, f"{r['steps']:,}", str(r["optimizer"]), str(r["batch_size"]),
                     f"{r['lr']:g}", schedule, f"{r['warmup_steps']:,}", f"{r['weight_decay']:g}",
                     other))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in rows)
