"""A MerakTrainer job (dp=2 x pp=2, tiny GPT-2) for the automatic-restart test, run by torchrun.

``python restart_job.py OUT [KILL_STEP VICTIM]``: trains 6 steps saving every 2, resuming from the
last complete checkpoint of OUT when there is one (``resume_from_checkpoint=True``). With
KILL_STEP, rank VICTIM SIGKILLs itself at the end of that step - in the first attempt only
(``TORCHELASTIC_RESTART_COUNT`` is 0), so torchrun's restart finishes the job. Rank 0 writes the
loss history to OUT/losses.json.
"""

from __future__ import annotations

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_models import tiny_model  # noqa: E402

SEQ, MICRO, STEPS = 8, 2, 6


def main(out: str, kill_step: int | None, victim: int | None) -> None:
    from transformers import TrainerCallback

    import merak
    from merak.checkpoint import last_complete_checkpoint

    grid = merak.init(dp=2, pp=2)
    model, make_batch = tiny_model("gpt2")
    samples = [{k: v[0] for k, v in make_batch(batch_size=1, seq_len=SEQ, seed=i).items()} for i in range(48)]
    args = merak.MerakArguments(
        output_dir=out, per_device_train_batch_size=MICRO, gradient_accumulation_steps=2, max_steps=STEPS,
        logging_steps=1, save_strategy="steps", save_steps=2, learning_rate=1e-2, seed=3, report_to="none",
        disable_tqdm=True)

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if (state.global_step == kill_step and grid.rank == victim
                    and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
                os.kill(os.getpid(), signal.SIGKILL)

    trainer = merak.MerakTrainer(model, args, train_dataset=samples, callbacks=[Crash()])
    resume = last_complete_checkpoint(out, also=("trainer_state.json",)) is not None
    trainer.train(resume_from_checkpoint=True if resume else None)
    if grid.rank == 0:
        losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump({"losses": losses, "restarts": os.environ.get("TORCHELASTIC_RESTART_COUNT")}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None, int(sys.argv[3]) if len(sys.argv) > 3 else None)
