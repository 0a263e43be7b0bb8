"""The documented public API works as written, in a fresh interpreter (no submodule imported first)."""

from __future__ import annotations

import subprocess
import sys


def test_documented_attribute_paths_resolve_in_a_fresh_interpreter():
    code = (
        "from memagent_jax import rl, models, sampler, agent\n"
        "fns = [rl.loss.policy_loss, rl.advantages.group_advantages, rl.advantages.overlong_penalty,\n"
        "       rl.advantages.filter_groups, rl.rewards.verify, rl.rewards.boxed_answer, rl.rewards.em,\n"
        "       rl.rewards.sub_em, rl.rewards.f1, rl.rewards.normalize_answer, models.from_pretrained,\n"
        "       models.save_pretrained, sampler.generate, agent.rollout, agent.make_policy]\n"
        "assert all(callable(f) for f in fns)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
