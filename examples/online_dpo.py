"""Online DPO on prompts with verifier rewards: two completions per prompt sampled from the policy, the one the
verifiers score higher is chosen.

    accelerate launch examples/online_dpo.py                  # embedded tiny chat model and arithmetic prompts, offline
    accelerate launch examples/online_dpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name openai/gsm8k --dataset_config main --dataset_test_split test --use_peft --learning_rate 5e-6

The dataset needs a `prompt` column and an `answer` column (a GSM8K answer works: what follows "####" is compared).
Rewards: `exact_match_reward` on `answer` (1.0 when the final answer is right) plus `starts_with_number` (1.0 when
the completion opens with a number), weighted by `--reward_weights` (default 1 each). Any `OnlineDPOConfig` field
is a flag (`--beta 0.05 --loss_type ipo --missing_eos_penalty 1.0`). To rank pairs with an RLAIF judge instead,
build the trainer in code with `judge=hf_align.verifiers.JudgeReward(judge_model, None, principles)`.
Writes the model, its card and training_metrics.png to --output_dir (default outputs/online-dpo).
"""

from hf_align.scripts import run
from hf_align.trainers.online_dpo import OnlineDPOTrainer
from hf_align.verifiers import exact_match_reward, regex_reward

REWARD_FUNCS = [exact_match_reward("answer"), regex_reward(r"\s*-?\d.*", name="starts_with_number")]

# For the embedded tiny model only: it starts from random weights, so it needs a large learning rate; arithmetic
# answers are short, and the missing-eos penalty teaches it to stop.
EMBEDDED_DEFAULTS = dict(
    learning_rate=1e-2, per_device_train_batch_size=16, max_new_tokens=8, missing_eos_penalty=1.0,
    num_train_epochs=1, logging_steps=5, eval_strategy="steps", eval_steps=10, per_device_eval_batch_size=16,
    save_strategy="no", report_to="none",
)


class VerifiedOnlineDPOTrainer(OnlineDPOTrainer):
    """`OnlineDPOTrainer` ranking pairs with `REWARD_FUNCS` (`scripts.run` passes no reward functions)."""

    def __init__(self, model, **kwargs):
        super().__init__(model, reward_funcs=REWARD_FUNCS, **kwargs)


if __name__ == "__main__":
    run(VerifiedOnlineDPOTrainer, "prompts", EMBEDDED_DEFAULTS)
