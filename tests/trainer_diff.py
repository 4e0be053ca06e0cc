"""Differential harness: one tiny HF training script, run under ``transformers.Trainer`` and under
``MerakTrainer`` (any layout), recording what a user can observe.

:func:`run_script` is the script (a module-level function, so ``dist_run`` can start it on
gloo ranks): it builds a tiny model of a *kind*, the same data, the same arguments, a
:class:`Recorder` callback and a stateful :class:`CountingCallback`, trains, evaluates and
predicts, and returns a :class:`Observed` dict: every callback event in order, ``log_history``,
checkpoint folders (after ``save_total_limit`` rotation) with their HF trainer files and
``trainer_state.json``, ``best_metric`` / ``best_model_checkpoint``, the evaluation metrics and
``predict()``'s ``PredictionOutput``. :func:`assert_same` compares two of them (losses and other
numbers with ``rtol``; wall-clock figures and Merak's extra throughput keys are left out).

Only the two trainer classes differ between the runs, as in the product's promise. The data
order is ``train_sampling_strategy="sequential"`` (HF's shuffling and Merak's layout-invariant
permutation are different random streams, each honoured) and every dataset holds whole global
batches (Merak drops an incomplete last one; see docs/trainer.md).

Model kinds: ``tuple`` (an ``nn.Module`` returning ``(loss, logits)``), ``dict`` (returning a
dict), ``gpt2`` (a causal LM on padded rows of varying length with ``-100`` labels, padded per
micro-batch by a collator), ``classifier`` (a BERT sequence classifier with ``compute_metrics``),
``seq2seq`` (a T5 conditional-generation model: encoder inputs, decoder labels).
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

SEQ, VOCAB, N_TRAIN, N_EVAL = 8, 96, 32, 12

#: log keys that measure time or Merak's own throughput: not compared
UNCOMPARED = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
              "eval_samples_per_second", "eval_steps_per_second", "test_runtime", "test_samples_per_second",
              "test_steps_per_second", "tokens_per_second", "tflops_per_device", "peak_memory_mb",
              "train_plan_seconds", "train_tokens_per_second"}
#: files HF's checkpoints carry that a Merak checkpoint must carry too (weights are Merak's shards)
HF_TRAINER_FILES = {"trainer_state.json", "training_args.bin", "scheduler.pt"}


class Recorder(TrainerCallback):
    """Every event, in order; ``on_log`` with its sorted keys."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("on_"):
            def record(args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                extra = f"({','.join(sorted(kwargs['logs']))})" if name == "on_log" else ""
                self.events.append(name + extra)
            return record
        return super().__getattribute__(name)


class CountingCallback(TrainerCallback, ExportableState):
    """A user's stateful callback: counts optimizer steps; its count must survive a resume."""

    def __init__(self, count: int = 0) -> None:
        self.count = count

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.count += 1

    def state(self) -> dict:
        return {"args": {"count": self.count}, "attributes": {}}


class TupleModel(nn.Module):
    """Plain torch, returns ``(loss, logits)``: HF takes ``outputs[0]`` as the loss."""

    def __init__(self, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(SEQ, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()) for _ in range(4))
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        logits = self.out(h)
        return nn.functional.cross_entropy(logits, labels), logits


class DictModel(TupleModel):
    """The same network returning a dict."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        loss, logits = super().forward(x, labels)
        return {"loss": loss, "logits": logits}


def pad_collator(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pads a micro-batch to its longest row: pad id 0, attention mask 0, label -100."""
    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _data(kind: str, n: int, seed: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        if kind in ("tuple", "dict"):
            x = torch.randn(SEQ, generator=g)
            rows.append({"x": x, "labels": int(x[:4].argmax())})
        elif kind == "gpt2":
            length = int(torch.randint(3, SEQ + 1, (1,), generator=g))
            ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
            labels = [t if i % 3 else -100 for i, t in enumerate(ids)]  # some -100 inside rows too
            rows.append({"input_ids": ids, "labels": labels})
        elif kind == "seq2seq":
            ids = torch.randint(1, VOCAB, (SEQ,), generator=g)
            rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long),
                         "labels": torch.randint(1, VOCAB, (SEQ // 2,), generator=g)})
        else:  # classifier
            ids = torch.randint(1, VOCAB, (SEQ,), generator=g)
            rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long),
                         "labels": int(ids[0] % 3)})
    return rows


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "tuple":
        return TupleModel()
    if kind == "dict":
        return DictModel()
    import transformers

    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        config._attn_implementation = "eager"
        return transformers.GPT2LMHeadModel(config)
    if kind == "seq2seq":
        config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                       num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
                                       decoder_start_token_id=0, pad_token_id=0)
        return transformers.T5ForConditionalGeneration(config)
    config = transformers.BertConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                     max_position_embeddings=64, vocab_size=VOCAB, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, num_labels=3)
    config._attn_implementation = "eager"
    return transformers.BertForSequenceClassification(config)


def _tokenizer() -> Any:
    """A word-level tokenizer built in memory (no hub): ``save_model`` must write it as HF's does."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w1")),
                                   unk_token="w1", pad_token="w0")


def accuracy(prediction: Any) -> dict[str, float]:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.asarray(logits).argmax(-1) == prediction.label_ids).mean())}


class Stream(torch.utils.data.IterableDataset):
    """The training rows as a stream (no ``len``): the trainer must then be sized by ``max_steps``."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __iter__(self) -> Any:
        return iter(self.rows)


def _as(data: str, rows: list[dict[str, Any]]) -> Any:
    """``list`` (map-style), ``stream`` (:class:`Stream`) or ``datasets`` (a ``datasets.Dataset``
    with an extra text column that ``remove_unused_columns`` must drop)."""
    if data == "stream":
        return Stream(rows)
    if data == "datasets":
        import datasets

        return datasets.Dataset.from_list([{**{k: v.tolist() if isinstance(v, torch.Tensor) else v
                                               for k, v in r.items()}, "note": f"row {i}"}
                                           for i, r in enumerate(rows)])
    return rows


def run_script(use_merak: bool, kind: str, out_dir: str, dp: int = 1, pp: int = 1, tp: int = 1, resume: str | None = None,
               early_stopping: int = 0, counter_start: int = 0, data: str = "list", **overrides: Any) -> dict[str, Any]:
    """The user's script; only the two class names (and ``merak.init``) change with ``use_merak``.
    ``data`` is how the training set comes (:func:`_as`)."""
    from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

    if use_merak:
        import merak

        merak.init(dp=dp, tp=tp, pp=pp)
        Trainer, TrainingArguments = merak.MerakTrainer, merak.MerakArguments  # noqa: N806 - the drop-in
    settings: dict[str, Any] = dict(
        output_dir=out_dir, per_device_train_batch_size=2, gradient_accumulation_steps=4 // dp,
        per_device_eval_batch_size=5, num_train_epochs=2, learning_rate=1e-2, lr_scheduler_type="linear",
        logging_steps=2, eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3,
        save_total_limit=2, seed=7, report_to="none", disable_tqdm=True, train_sampling_strategy="sequential",
        optim="adamw_torch", dataloader_pin_memory=False)
    settings.update(overrides)
    if use_merak:
        settings.update(p2p_timeout=120.0)
    args = TrainingArguments(**settings)
    recorder = Recorder()
    callbacks: list[Any] = [recorder, CountingCallback(counter_start)]
    if early_stopping:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=early_stopping))
    extra: dict[str, Any] = {"processing_class": _tokenizer()} if kind == "gpt2" else {}
    trainer = Trainer(model=_model(kind), args=args, train_dataset=_as(data, _data(kind, N_TRAIN, 1)), **extra,
                      eval_dataset=_data(kind, N_EVAL, 2), callbacks=callbacks,
                      data_collator=pad_collator if kind == "gpt2" else None,
                      compute_metrics=accuracy if kind == "classifier" else None)
    train = trainer.train(resume_from_checkpoint=resume)
    evaluation = trainer.evaluate()
    prediction = trainer.predict(_data(kind, N_EVAL, 3))
    checkpoints = {}
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("checkpoint-"):
            files = set(os.listdir(os.path.join(out_dir, name)))
            with open(os.path.join(out_dir, name, "trainer_state.json")) as f:
                import json

                state = json.load(f)
            checkpoints[name] = {"hf_files": sorted(files & HF_TRAINER_FILES), "state": state}
    trainer.save_model(os.path.join(out_dir, "final"))
    # A sharded save (one file per stage + index, issue 18) is the same HF format as one file.
    saved = sorted({re.sub(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$", "model.safetensors", n)
                    for n in os.listdir(os.path.join(out_dir, "final"))})
    best = trainer.state.best_model_checkpoint
    return {
        "events": recorder.events, "log_history": trainer.state.log_history, "checkpoints": checkpoints,
        "best_metric": trainer.state.best_metric, "best_model_checkpoint": os.path.basename(best) if best else None,
        "global_step": train.global_step, "training_loss": train.training_loss, "eval": evaluation,
        "predict": {"predictions": prediction.predictions, "label_ids": prediction.label_ids,
                    "metrics": prediction.metrics},
        # HF's callback-state restore replaces the instance in the handler: read the live one
        "saved": saved,
        "counter": next(c.count for c in trainer.callback_handler.callbacks if isinstance(c, CountingCallback)),
    }


# ---- comparison ---------------------------------------------------------------------------------
def _close(a: Any, b: Any, rtol: float, where: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict), f"{where}: {type(b).__name__} instead of a dict"
        keys_a, keys_b = set(a) - UNCOMPARED, set(b) - UNCOMPARED
        assert keys_a == keys_b, f"{where}: keys differ: only HF {sorted(keys_a - keys_b)}, only Merak {sorted(keys_b - keys_a)}"
        for k in sorted(keys_a):
            _close(a[k], b[k], rtol, f"{where}.{k}")
    elif isinstance(a, (list, tuple)) and not (a and isinstance(a[0], (int, float)) and isinstance(b, np.ndarray)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths {len(a)} vs {len(b) if hasattr(b, '__len__') else b}"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, rtol, f"{where}[{i}]")
    elif isinstance(a, (np.ndarray, torch.Tensor, float)) and not isinstance(a, bool):
        # atol: logits near zero after training differ by summation order (~1e-6) between layouts
        np.testing.assert_allclose(np.asarray(b, dtype=np.float64), np.asarray(a, dtype=np.float64), rtol=rtol,
                                   atol=1e-5, err_msg=where)
    else:
        assert a == b, f"{where}: HF {a!r} vs Merak {b!r}"


#: events fired once per micro-batch (or evaluation batch) of a process: their count depends on
#: how many of them each process runs, as it does between HF runs on different world sizes
PER_BATCH_EVENTS = ("on_prediction_step", "on_substep_end")


def collapse_per_batch_events(events: list[str]) -> list[str]:
    """One ``EVENT*`` per run of a per-batch event (compared so when dp > 1: a replica runs
    ``gradient_accumulation_steps / dp`` micro-batches where the one-process HF run runs all)."""
    out: list[str] = []
    for e in events:
        e = e + "*" if e in PER_BATCH_EVENTS else e
        if not (out and out[-1] == e and e.endswith("*")):
            out.append(e)
    return out


def _strip_state(state: dict[str, Any]) -> dict[str, Any]:
    state = dict(state)
    state["log_history"] = [{k: v for k, v in e.items() if k not in UNCOMPARED} for e in state["log_history"]]
    if state.get("best_model_checkpoint"):
        state["best_model_checkpoint"] = os.path.basename(state["best_model_checkpoint"])
    for key in ("total_flos", "train_batch_size"):  # train_batch_size: HF's per-device micro-batch, both
        state.pop(key, None)
    return state


def assert_same(hf: dict[str, Any], merak: dict[str, Any], rtol: float = 1e-5, exact_events: bool = True) -> None:
    """What a user sees must match: events, logs, checkpoints, best model, metrics, predictions."""
    ev_hf, ev_mk = hf["events"], merak["events"]
    if not exact_events:
        ev_hf, ev_mk = collapse_per_batch_events(ev_hf), collapse_per_batch_events(ev_mk)
    assert ev_hf == ev_mk, _first_difference(ev_hf, ev_mk)
    _close([{k: v for k, v in e.items() if k not in UNCOMPARED} for e in hf["log_history"]],
           [{k: v for k, v in e.items() if k not in UNCOMPARED} for e in merak["log_history"]], rtol, "log_history")
    assert sorted(hf["checkpoints"]) == sorted(merak["checkpoints"]), (sorted(hf["checkpoints"]), sorted(merak["checkpoints"]))
    for name, saved in hf["checkpoints"].items():
        assert saved["hf_files"] == merak["checkpoints"][name]["hf_files"], name
        _close(_strip_state(saved["state"]), _strip_state(merak["checkpoints"][name]["state"]), rtol, f"{name}/trainer_state")
    for key in ("best_metric", "best_model_checkpoint", "global_step", "training_loss", "eval", "predict", "counter",
                "saved"):
        _close(hf[key], merak[key], rtol, key)


def _first_difference(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"events differ at {i}: HF {a[max(0, i - 3):i + 4]} vs Merak {b[max(0, i - 3):i + 4]}"
    return f"event counts differ: HF {len(a)} vs Merak {len(b)}; tails HF {a[-5:]} Merak {b[-5:]}"
