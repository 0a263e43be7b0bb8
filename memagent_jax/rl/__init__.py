"""RL: rewards, group advantages, the DAPO loss and log-probs (imported here, so
`from memagent_jax import rl; rl.loss.policy_loss(...)` works as documented), plus the trainer,
train step, batching and SFT warm start (import those submodules by name)."""

from memagent_jax.rl import advantages, logprobs, loss, rewards

__all__ = ["advantages", "logprobs", "loss", "rewards"]
