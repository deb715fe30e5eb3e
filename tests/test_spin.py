"""SPINTrainer: every round regenerates the rejected responses from the current policy, the reference of round t is
the policy at the start of round t (full fine-tuning and peft), a fresh optimizer per round, chat data and
per-round checkpoints, data validation, and the held-out ground-truth vs self-generated log-likelihood gap rising
over rounds."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, TrainerCallback

from hf_align import DataError, SFTConfig, SFTTrainer, SPINConfig, SPINTrainer
from hf_align import generation
from hf_align.generation import generate_completions
from hf_align.logprobs import completion_logprobs
from test_reinforce import launch_two_processes

QUIET = dict(report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=100)


@pytest.fixture(scope="module")
def sft_model_path(tiny_model_path, tmp_path_factory):
    """The tiny model after a short SFT on the embedded `sft` data: SPIN starts from an SFT model, whose greedy
    responses are plausible and more likely under it than the ground truth."""
    from transformers import AutoTokenizer

    from hf_align.defaults import load_default_dataset

    torch.set_num_threads(1)
    path = str(tmp_path_factory.mktemp("spin-sft") / "model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    args = SFTConfig(output_dir=path, learning_rate=1e-3, num_train_epochs=6, per_device_train_batch_size=16,
                     lr_scheduler_type="constant", seed=0, **QUIET)
    trainer = SFTTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_path), args=args,
                         train_dataset=load_default_dataset("sft"), processing_class=tokenizer)
    trainer.train()
    trainer.save_model(path)
    return path


class RoundRecorder(TrainerCallback):
    """At each round's start (`on_train_begin`, after the pairs and reference are built): the round's pairs, the
    reference columns, the optimizer and a copy of the policy's weights."""

    def __init__(self):
        self.trainer = None
        self.rounds = []

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        trainer = self.trainer
        self.rounds.append({
            "round": trainer.round,
            "rejected": list(trainer.round_pairs["train"]["rejected"]),
            "train": trainer.train_dataset,
            "eval": trainer.eval_dataset,
            "optimizer": optimizer,
            "optimizer_state_size": len(optimizer.state),
            "scheduler": lr_scheduler,
            "scheduler_step": lr_scheduler.last_epoch,
            "policy": {name: value.detach().clone() for name, value in trainer.model.state_dict().items()},
        })


def _spin(model, tokenizer, train, eval_dataset, tmp_path, callbacks=(), peft_config=None, **config):
    args = SPINConfig(output_dir=str(tmp_path / "spin"), **{**QUIET, **config})
    trainer = SPINTrainer(model, args=args, train_dataset=train, eval_dataset=eval_dataset,
                          processing_class=tokenizer, callbacks=list(callbacks), peft_config=peft_config)
    for callback in callbacks:
        callback.trainer = trainer
    return trainer


def _pair_logps(model, trainer, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the pairs' chosen and rejected completions under `model`."""
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    model.eval()
    with torch.no_grad():
        logps = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).sum
    return logps.chunk(2)


def _model_with(path, state):
    model = AutoModelForCausalLM.from_pretrained(path)
    model.load_state_dict(state)
    return model


# ---------------------------------------------------------------------------------------------- the rounds


def test_rounds_regenerate_from_the_current_policy_against_it_as_reference(sft_model_path, tiny_tokenizer,
                                                                          embedded_data, tmp_path):
    train, test = embedded_data("sft", 64), embedded_data("sft", 32, split="test")
    recorder = RoundRecorder()
    trainer = _spin(
        AutoModelForCausalLM.from_pretrained(sft_model_path), tiny_tokenizer, train, test, tmp_path, [recorder],
        num_rounds=3, max_new_tokens=32, temperature=0.0, learning_rate=2e-5, warmup_steps=0.0,
        num_train_epochs=2, per_device_train_batch_size=8, seed=0,
    )
    initial = {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}
    trainer.train()
    rounds, history = recorder.rounds, trainer.round_history
    assert [r["round"] for r in rounds] == [0, 1, 2] and [h["round"] for h in history] == [0, 1, 2]

    # Round 0 starts from the model given; each later round from where the previous one ended, with a fresh
    # optimizer (no state yet) and its own schedule.
    assert all(torch.equal(rounds[0]["policy"][k], initial[k]) for k in initial)
    assert len({id(r["optimizer"]) for r in rounds}) == 3 and all(r["optimizer_state_size"] == 0 for r in rounds)
    assert len({id(r["scheduler"]) for r in rounds}) == 3 and all(r["scheduler_step"] == 0 for r in rounds)

    sampling = trainer.args.sampling(seed=0)
    for t in (1, 2):
        # New rejected responses each round ...
        changed = sum(a != b for a, b in zip(rounds[t]["rejected"], rounds[t - 1]["rejected"]))
        assert changed >= 8, f"round {t} regenerated only {changed} of 64 responses differently"
        # ... sampled (greedily) from the policy as round t starts, i.e. as round t - 1 left it.
        policy = _model_with(sft_model_path, rounds[t]["policy"])
        regenerated = generate_completions(policy, tiny_tokenizer, train["prompt"], sampling).texts
        assert rounds[t]["rejected"] == regenerated
        # The reference columns of round t are that policy's log-probs, not the initial model's.
        chosen, rejected = _pair_logps(policy, trainer, rounds[t]["train"])
        torch.testing.assert_close(torch.tensor(rounds[t]["train"]["ref_chosen_logps"]), chosen, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(torch.tensor(rounds[t]["train"]["ref_rejected_logps"]), rejected, rtol=1e-5,
                                   atol=1e-4)
        initial_chosen, _ = _pair_logps(_model_with(sft_model_path, initial), trainer, rounds[t]["train"])
        assert (initial_chosen - chosen).abs().max() > 0.1

    # The combined log: every round's entries, steps counting on across rounds (16 optimizer steps a round).
    assert trainer.state.global_step == 48
    steps = [entry["step"] for entry in trainer.state.log_history]
    assert steps == sorted(steps) and steps[-1] == 48
    assert {entry["round"] for entry in trainer.state.log_history} == {0, 1, 2}

    # Learning. Each round raises logp(ground truth) - logp(own response) on its pairs ...
    print("[spin] rounds:", [{k: round(v, 2) for k, v in h.items()} for h in history])
    assert all(h["gap_end"] > h["gap_start"] for h in history)
    # ... and on held-out prompts the gap between the ground truth and the policy's own fresh responses closes
    # from below: the SFT model prefers its own responses, SPIN moves it toward the ground truth.
    eval_gaps = [h["eval_gap_start"] for h in history]
    assert eval_gaps[0] < -2
    assert eval_gaps == sorted(eval_gaps) and eval_gaps[2] > eval_gaps[0] + 1
    # On fixed held-out pairs (the ground truth vs the initial model's responses), the trained policy prefers the
    # ground truth by a wider margin than the initial model did.
    fixed = rounds[0]["eval"]
    chosen, rejected = _pair_logps(trainer.model, trainer, fixed)
    initial_gap = torch.tensor(fixed["ref_chosen_logps"]) - torch.tensor(fixed["ref_rejected_logps"])
    assert initial_gap.mean() == pytest.approx(history[0]["eval_gap_start"], abs=1e-4)
    improvement = (chosen - rejected) - initial_gap
    assert improvement.mean() > 0.5 and (improvement > 0).float().mean() >= 0.9


def test_peft_reference_is_the_adapter_policy_at_the_round_start(sft_model_path, tiny_tokenizer, embedded_data,
                                                                 tmp_path):
    """With LoRA no reference model or adapter copy is kept: round t's reference columns are the policy's log-probs
    with its adapter as round t starts (after round 0 that is not the base model)."""
    recorder = RoundRecorder()
    trainer = _spin(
        AutoModelForCausalLM.from_pretrained(sft_model_path), tiny_tokenizer, embedded_data("sft", 16), None,
        tmp_path, [recorder], peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        num_rounds=2, max_new_tokens=16, temperature=0.0, learning_rate=5e-3, warmup_steps=0.0, max_steps=4,
        per_device_train_batch_size=8,
    )
    assert trainer.ref_model is None
    trainer.train()
    pairs = recorder.rounds[1]["train"]
    batch = trainer.data_collator([pairs[i] for i in range(len(pairs))])
    policy = trainer.model
    policy.set_adapter("default")
    adapter = {k: v for k, v in recorder.rounds[1]["policy"].items() if "lora_" in k}
    assert adapter and all(not torch.equal(adapter[k], recorder.rounds[0]["policy"][k]) for k in adapter
                           if "lora_B" in k)
    # Put the adapter back as it was when round 1 started, then score the pairs with and without it.
    current = {k: v.clone() for k, v in policy.state_dict().items()}
    policy.load_state_dict(recorder.rounds[1]["policy"])
    with_adapter = trainer.policy_logps(batch)
    with policy.disable_adapter():
        base = trainer.policy_logps(batch)
    policy.load_state_dict(current)
    torch.testing.assert_close(torch.tensor(pairs["ref_chosen_logps"]), with_adapter["chosen_logps"], rtol=1e-5,
                               atol=1e-4)
    assert (with_adapter["chosen_logps"] - base["chosen_logps"]).abs().max() > 0.1
    assert all("lora_" in name for name, p in policy.named_parameters() if p.requires_grad)


def test_chat_messages_and_per_round_checkpoints(tiny_model_path, tiny_tokenizer, embedded_data, tmp_path):
    """`messages` rows (the last turn is the ground truth); the rejected responses become assistant messages; each
    round's checkpoints go to their own folder, though each round counts its steps from 0."""
    trainer = _spin(
        AutoModelForCausalLM.from_pretrained(tiny_model_path), tiny_tokenizer, embedded_data("sft_conversational", 8),
        embedded_data("sft_conversational", 4, split="test"), tmp_path, num_rounds=2, max_new_tokens=8,
        temperature=1.0, max_steps=2, per_device_train_batch_size=4, **{**QUIET, "save_strategy": "steps"},
        save_steps=2,
    )
    trainer.train()
    pairs = trainer.round_pairs["train"]
    assert pairs[0]["prompt"][-1]["role"] == "user" and pairs[0]["chosen"][0]["role"] == "assistant"
    assert all(rejected[0]["role"] == "assistant" for rejected in pairs["rejected"])
    row = trainer.train_dataset[0]
    assert tiny_tokenizer.decode(row["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert tiny_tokenizer.decode(row["rejected_ids"]).endswith("<|im_end|>\n")
    for round_index in (0, 1):
        assert os.path.isfile(tmp_path / "spin" / f"round-{round_index}" / "checkpoint-2" / "model.safetensors")
    assert "eval_loss" in trainer.evaluate() and "eval_gap_start" in trainer.round_history[1]


def test_whitespace_only_responses_are_kept(tiny_model_path, tiny_tokenizer, embedded_data, tmp_path, monkeypatch):
    """A response that is only whitespace (the model stopped at once) stays a rejected response, ended by eos."""
    def blank(model, tokenizer, prompts, sampling):
        texts = [" \n" if i % 2 == 0 else "" for i in range(len(prompts))]
        return generation.Completions([], torch.zeros(0, 0), torch.zeros(0, 0), texts)

    monkeypatch.setattr("hf_align.trainers.spin.generate_completions", blank)
    trainer = _spin(AutoModelForCausalLM.from_pretrained(tiny_model_path), tiny_tokenizer, embedded_data("sft", 4),
                    None, tmp_path, num_rounds=1, max_steps=1, per_device_train_batch_size=4)
    trainer.train()
    eos = tiny_tokenizer.eos_token_id
    assert trainer.train_dataset[1]["rejected_ids"] == [eos]
    assert trainer.train_dataset[0]["rejected_ids"][-1] == eos and len(trainer.train_dataset[0]["rejected_ids"]) > 1


# ------------------------------------------------------------------------------------------------- validation


def _sft_rows(n: int = 4) -> list[dict]:
    return [{"prompt": f"Question: {i}?\nAnswer:", "completion": f" Sure, {i}."} for i in range(n)]


MALFORMED = {
    "missing-completion": ([{"prompt": "Question: 1?\nAnswer:"}] * 3, ["train dataset", "completion"]),
    "empty-completion-row-2": (
        [{**row, "completion": "" if i == 2 else row["completion"]} for i, row in enumerate(_sft_rows())],
        ["row 2", "'completion'", "empty"],
    ),
    "messages-ending-with-user-row-1": (
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
         {"messages": [{"role": "user", "content": "Hi"}]}],
        ["row 1", "'messages'", "final assistant turn"],
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_sft_rows_raise_before_training(case, tiny_model_path, tiny_tokenizer, tmp_path):
    rows, fragments = MALFORMED[case]
    with pytest.raises(DataError) as info:
        _spin(AutoModelForCausalLM.from_pretrained(tiny_model_path), tiny_tokenizer, Dataset.from_list(rows), None,
              tmp_path)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"


def test_config_and_constructor_guards(tiny_model_path, tiny_tokenizer, tmp_path):
    config = SPINConfig(output_dir=str(tmp_path / "o"), report_to="none")
    assert (config.beta, config.learning_rate, config.loss_type, config.num_rounds) == (0.1, 5e-7, ["sigmoid"], 3)
    assert (config.temperature, config.top_p, config.max_new_tokens) == (0.8, 0.95, 256)
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        SPINConfig(output_dir=str(tmp_path / "o"), precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="num_rounds"):
        SPINConfig(output_dir=str(tmp_path / "o"), num_rounds=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="fresh optimizer"):
        SPINTrainer(model, args=config, train_dataset=Dataset.from_list(_sft_rows()), processing_class=tiny_tokenizer,
                    optimizers=(optimizer, None))
    trainer = _spin(model, tiny_tokenizer, Dataset.from_list(_sft_rows()), None, tmp_path)
    assert trainer.ref_model is None and trainer.train_dataset is None
    with pytest.raises(ValueError, match="start of each round"):
        trainer.evaluate(Dataset.from_list(_sft_rows()))


# ------------------------------------------------------------------------------------------------------------ DDP

DDP_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from hf_align import SPINConfig, SPINTrainer

model_path, rows_path, out = sys.argv[1:4]
rows = json.load(open(rows_path))
args = SPINConfig(output_dir=out, num_rounds=1, max_new_tokens=8, temperature=0.0, max_steps=1,
                  per_device_train_batch_size=2, report_to="none", save_strategy="no", disable_tqdm=True)
trainer = SPINTrainer(AutoModelForCausalLM.from_pretrained(model_path), args=args,
                      train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(model_path))
trainer.train()
rank = trainer.accelerator.process_index
json.dump({"world": trainer.accelerator.num_processes, "wrapper": type(trainer.model_wrapped).__name__,
           "rejected": list(trainer.round_pairs["train"]["rejected"]),
           "ref": list(trainer.train_dataset["ref_rejected_logps"])}, open(f"{out}/rank{rank}.json", "w"))
"""


def test_slow_ddp_ranks_share_the_generation(tiny_model_path, tiny_tokenizer, embedded_data, tmp_path):
    """Under 2-process DDP each rank samples its share of the prompts; both end with every response, in order."""
    rows = embedded_data("sft", 7).to_list()  # an odd count: the shares differ
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    launch_two_processes(DDP_SCRIPT, tmp_path, tiny_model_path, tmp_path / "rows.json", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["wrapper"] == "DistributedDataParallel" for r in ranks)
    expected = generate_completions(AutoModelForCausalLM.from_pretrained(tiny_model_path), tiny_tokenizer,
                                    [row["prompt"] for row in rows],
                                    generation.SamplingConfig(max_new_tokens=8, temperature=0)).texts
    assert ranks[0]["rejected"] == ranks[1]["rejected"] == [text if text.strip() else text + "<|endoftext|>"
                                                            for text in expected]
    assert ranks[0]["ref"] == pytest.approx(ranks[1]["ref"], abs=1e-5)
