"""GRPO's and RLOO's TR-DPO reference updates (`sync_ref_model`) and Mixture-of-Experts load-balancing loss
(`router_aux_loss_coef`) against TRL 1.16, on the fixed completions of `test_grpo` (see `test_parity_sweep.run_pair`)."""

from __future__ import annotations

import pytest
from test_grpo import patch_hf_align_generation  # noqa: F401 - a fixture
from test_parity_sweep import compare, run_pair
from test_shared_options import _mixtral_path

pytest.importorskip("trl")
pytestmark = pytest.mark.usefixtures("patch_hf_align_generation")


@pytest.mark.parametrize("name", ["GRPO", "RLOO"])
def test_reference_sync_matches_trl(name, tiny_model_path, embedded_data, preference_data, tmp_path):
    """The reference moves halfway to the policy after the second of four steps: the KL of the later steps is
    against the moved reference (TRL's and hf_align's alike, and unlike a run without the updates)."""
    options = dict(max_steps=4, sync_ref_model=True, ref_model_mixup_alpha=0.5, ref_model_sync_steps=2)
    theirs, ours = run_pair(name, lambda: tiny_model_path, tiny_model_path, embedded_data, preference_data, tmp_path,
                            **options)
    compare(theirs, ours, steps=4, label=f"{name} sync_ref_model")
    _, unsynced = run_pair(name, lambda: tiny_model_path, tiny_model_path, embedded_data, preference_data,
                           tmp_path / "unsynced", max_steps=4)
    kl = "kl" if name == "GRPO" else "objective/kl"
    later = [abs(a.get(kl, a["loss"]) - b.get(kl, b["loss"])) for a, b in zip(ours[2:], unsynced[2:])]
    assert max(later) > 1e-6, "the reference updates change nothing: the test cannot fail"


@pytest.mark.parametrize("name", ["GRPO", "RLOO"])
def test_router_aux_loss_matches_trl(name, tiny_tokenizer, embedded_data, preference_data, tmp_path):
    path = _mixtral_path(tiny_tokenizer, tmp_path / "mixtral")
    theirs, ours = run_pair(name, lambda: path, path, embedded_data, preference_data, tmp_path,
                            router_aux_loss_coef=0.5)
    compare(theirs, ours, steps=2, label=f"{name} router_aux_loss_coef")
    assert all(entry["aux_loss"] > 0 for entry in ours)
