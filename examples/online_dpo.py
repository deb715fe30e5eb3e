"""Online DPO (arXiv 2402.04792) with verifiable rewards: sample two answers per prompt from the policy, check each
with a verifier, and train DPO on the pair, the better-scored answer as chosen.

    accelerate launch examples/online_dpo.py    # embedded tiny model (after a short SFT) on "Which is larger, a or b?"
    accelerate launch examples/online_dpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/DeepMath-103K --use_peft --max_new_tokens 1024 --max_length 2048

The reward is a verifier picked from the dataset's columns, as in examples/grpo.py (`verifier_rewards`). Any
`OnlineDPOConfig` field is a flag (`--beta 0.05 --loss_type ipo --missing_eos_penalty 1.0`); batch sizes count
completions, two per prompt. To rank pairs with an RLAIF judge instead, build the trainer in Python with
`judge=hf_align.verifiers.JudgeReward(judge_model, None, principles)`. Prints the held-out accuracy before and after
on the embedded default. Writes the model, its card and training_metrics.png to --output_dir (default
outputs/online-dpo).
"""

from hf_align.scripts import run_rlvr
from hf_align.trainers.online_dpo import OnlineDPOTrainer

# For the embedded tiny model only (after its SFT warm start): short answers, a large learning rate.
EMBEDDED_DEFAULTS = dict(
    learning_rate=1e-3, max_steps=150, per_device_train_batch_size=16, max_new_tokens=6, logging_steps=10,
    save_strategy="no", report_to="none",
)


if __name__ == "__main__":
    run_rlvr(OnlineDPOTrainer, EMBEDDED_DEFAULTS)
