"""The classic three-stage RLHF pipeline (InstructGPT, arXiv 2203.02155) in one script: supervised fine-tuning, a
reward model trained on preference pairs, then PPO (arXiv 1707.06347) of the SFT model against that reward model.

    python examples/ppo.py          # embedded tiny chat model, its SFT pairs and preference pairs, offline
    accelerate launch examples/ppo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --sft_dataset_name trl-lib/Capybara --dataset_name trl-lib/ultrafeedback_binarized \
        --prompt_dataset_name trl-lib/ultrafeedback-prompt --use_peft --learning_rate 1e-5 \
        --max_completion_length 256 --eval_strategy steps --eval_steps 500 --eval_on_start

Each stage writes a model (with its tokenizer, card and training_metrics.png) that the next one loads:

1. SFT of --model_name_or_path on --sft_dataset_name (default: the embedded "sft" pairs) into --sft_output_dir
   (default outputs/ppo-sft). --sft_model_name_or_path skips this stage and starts from that checkpoint.
2. A Bradley–Terry reward model (`RewardTrainer`) initialised from the SFT model, on the pairs of --dataset_name
   (default: the embedded "preference" pairs), into --reward_output_dir (default outputs/ppo-reward).
   --reward_model_name_or_path skips this stage and uses that reward model.
3. PPO from the SFT model on the prompts of --prompt_dataset_name (default: --dataset_name, which then needs a
   `prompt` column), scored by the reward model, into --output_dir (default outputs/ppo). The critic is a copy of the
   reward model, as in InstructGPT (--critic reward_model), or a value head on the policy (--critic value_head: with
   --use_peft the policy, its reference and the critic then share one copy of the base weights).

Every `PPOConfig` field is a flag (--beta, --adaptive_kl, --target_kl, --num_iterations, --vf_coef, ...), as are
--use_peft / --load_in_4bit and the LoRA settings: these apply to the PPO stage. The SFT and reward stages train every
weight; each of their Config fields is a flag with the stage's prefix, written with "=": --sft.learning_rate=2e-5,
--reward.num_train_epochs=1. --dataset_config / --dataset_train_split / --dataset_test_split apply to the preference
and prompt datasets. At the end the script prints the reward model's accuracy on held-out pairs and the mean reward of
the policy's completions to held-out prompts before and after PPO (PPO's evaluation at its first and last step: with
a Hub model, pass --eval_strategy steps --eval_steps N --eval_on_start as above to get them).
"""

from hf_align.recipes import run_recipe


def main(argv: list[str] | None = None):
    """Trains as `hf-align ppo` does (hf_align.recipes); `argv` defaults to the command line."""
    return run_recipe("ppo", argv)


if __name__ == "__main__":
    main()
