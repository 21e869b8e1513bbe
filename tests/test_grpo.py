"""GRPO: the on-policy loop, the loss identities of the paper, reward wiring, and learning."""

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from alignlab.algorithms import GRPO
from alignlab.algorithms.base import token_lists
from alignlab.algorithms.on_policy import Rollout
from conftest import datamodule, fit, learning_seeds, rl_learning_run, tiny_arch


# ------------------------------------------------------------------ reward functions used by path
def length_reward(prompts, completions, completion_ids, **kwargs):
    """Deterministic and varied within a group: the number of completion tokens."""
    return [float(len(ids)) for ids in completion_ids]


def constant_reward(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def short_reward(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def broken_reward(prompts, completions, **kwargs):
    raise KeyError("no such column")


# ------------------------------------------------------------------------------------- helpers
def first_batch(dm) -> dict:
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def perturb(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Move the policy away from the reference so that KL > 0 at the first step."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def metrics_of(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------------ rollout text
def test_completions_are_decoded_from_the_masked_tokens_of_each_row():
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]])  # a prefix, and a span in the middle (RM/DPO masks)
    assert token_lists(ids, mask) == [[5, 6], [10, 11]]
    module = GRPO(arch=tiny_arch())
    assert module.decode(ids, mask) == [module.tokenizer.decode(t, skip_special_tokens=True) for t in ([5, 6], [10, 11])]


# ------------------------------------------------------------------------- fixed log-probs
def test_reference_logps_in_trimmed_grouped_chunks_equal_one_padded_forward():
    """Chunks of micro_batch_size rows, a group's rows together (their prompt computed once), each trimmed of
    padding: the same log-probs as one padded forward of every row's prompt + completion."""
    module = GRPO(arch=tiny_arch(), num_generations=2, micro_batch_size=4)
    g = torch.Generator().manual_seed(0)
    N, P, C = 8, 6, 9
    prompt_index = torch.tensor([2, 0, 1, 0, 3, 1, 2, 3])  # 4 prompts x 2 rows, shuffled
    starts = torch.tensor([2, 0, 3, 1])[prompt_index]  # left padding of each prompt
    prompt_mask = (torch.arange(P) >= starts[:, None]).long()
    prompt_ids = (torch.randint(4, 128, (4, P), generator=g)[prompt_index]) * prompt_mask
    lengths = torch.tensor([3, 2, 5, 1, 2, 3, 4, 1])  # max 5 < C: every chunk is trimmed
    completion_mask = (torch.arange(C) < lengths[:, None]).long()
    r = Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                completion_ids=torch.randint(4, 128, (N, C), generator=g) * completion_mask,
                completion_mask=completion_mask, truncated=lengths == C, prompts=[""] * N, completions=[""] * N,
                prompt_index=prompt_index)
    with torch.no_grad():
        full = module.completion_logps(module.ref, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    chunks = module.row_chunks(r, 4)
    assert [sorted(prompt_index[c].tolist()) for c in chunks] == [[0, 0, 1, 1], [2, 2, 3, 3]]
    chunked = module.logps_no_grad(module.ref, r)
    real = completion_mask.bool()
    torch.testing.assert_close(chunked[real], full[real], atol=1e-5, rtol=1e-5)
    assert chunked.shape == (N, C) and (chunked[:, 5:] == 0).all()  # trimmed columns: padding only


def test_rollout_cat_keeps_prompt_groups_distinct():
    """DAPO concatenates rounds whose prompt_index both start at 0: after cat, groups stay apart."""
    def part(n_prompts, C):
        N = 2 * n_prompts
        return Rollout(prompt_ids=torch.ones(N, 3, dtype=torch.long), prompt_mask=torch.ones(N, 3, dtype=torch.long),
                       completion_ids=torch.ones(N, C, dtype=torch.long), completion_mask=torch.ones(N, C, dtype=torch.long),
                       truncated=torch.zeros(N, dtype=torch.bool), prompts=[""] * N, completions=[""] * N,
                       prompt_index=torch.arange(n_prompts).repeat_interleave(2))
    r = Rollout.cat([part(2, 4), part(3, 2), part(1, 5)])
    assert r.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert r.completion_ids.shape == (12, 5)


def ragged_rollout(module, batch) -> Rollout:
    """A sampled rollout cut to completions of 1..C tokens (a random tiny model almost never samples EOS)."""
    r = module.rollout(batch)
    N, C = r.completion_ids.shape
    r.completion_mask = (torch.arange(C) < (torch.arange(N) % C + 1)[:, None]).long()
    r.completion_ids = r.completion_ids * r.completion_mask
    module.score(r)
    return r


def test_micro_batches_give_the_same_gradients_and_metrics_as_one_pass():
    runs = []
    for micro in (None, 3):
        torch.manual_seed(0)
        module = GRPO(arch=tiny_arch(), beta=0.5, num_generations=4, num_iterations=2, micro_batch_size=micro,
                      max_grad_norm=0.0, lr=1e-2, reward_funcs=["test_grpo.length_reward"])
        module.make_rollout = lambda batch, m=module: ragged_rollout(m, batch)
        grads = []

        class Grads(L.Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                grads.append([p.grad.clone() for p in pl_module.policy.parameters()])

        trainer = fit(module, datamodule("prompt", batch_size=4), max_steps=2, callbacks=[Grads()])
        runs.append((grads, metrics_of(trainer)))
    (g_one, m_one), (g_micro, m_micro) = runs
    assert len(g_one) == len(g_micro) == 2  # both passes over the rollout (the second one off-policy)
    for a, b in zip(sum(g_one, []), sum(g_micro, [])):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    for k in ("train/loss", "train/kl", "train/entropy", "train/clip_ratio/region", "train/reward"):
        assert m_micro[k] == pytest.approx(m_one[k], rel=1e-4, abs=1e-6), k
    assert m_one["train/kl"] > 0


# --------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("beta", [0.04, 0.5])
def test_first_step_loss_is_beta_times_kl_and_ratio_is_one(beta):
    module = GRPO(arch=tiny_arch(), beta=beta, num_generations=4, reward_funcs=["test_grpo.length_reward"])
    perturb(module.policy)  # the reference stays at the initial weights: KL > 0 from step 1
    trainer = fit(module, datamodule("prompt", batch_size=4), max_steps=1)
    m = metrics_of(trainer)
    assert m["train/reward_std"] > 0  # non-trivial advantages, yet...
    assert m["train/ratio/mean"] == 1.0  # pi_old is pi_theta: logp - logp.detach() == 0 exactly
    assert m["train/clip_ratio/region"] == 0.0
    assert m["train/kl"] > 1e-3
    # ...the policy term is 1/G sum_i A_i = 0, so the loss is beta * KL
    assert m["train/loss"] == pytest.approx(beta * m["train/kl"], rel=1e-4, abs=1e-6)


def test_token_mean_breaks_the_identity_when_lengths_differ():
    """Documented in grpo.py: with token-mean the policy term is sum_i A_i |o_i| / N, not 0."""
    module = GRPO(arch=tiny_arch(), beta=0.04, num_generations=4, loss_agg_mode="token-mean",
                  reward_funcs=["test_grpo.length_reward"])
    trainer = fit(module, datamodule("prompt", batch_size=4), max_steps=1)
    m = metrics_of(trainer)
    assert m["train/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert m["train/loss"] < -0.05  # longer completions (A > 0) carry more tokens


def test_num_iterations_stores_logp_old_and_takes_more_steps():
    dm = datamodule("prompt", batch_size=4)
    batch = first_batch(dm)
    single = GRPO(arch=tiny_arch(), num_generations=4, reward_funcs=["test_grpo.length_reward"])
    r = single.make_rollout(batch)
    single.prepare(r)
    single.compute_advantages(r)
    assert r.logp_old is None  # one update per rollout: logp.detach() is pi_old
    assert r.ref_logp is not None and r.ref_logp.shape == r.completion_ids.shape

    module = GRPO(arch=tiny_arch(), num_generations=4, num_iterations=2, minibatches=2, lr=1e-2,
                  reward_funcs=["test_grpo.length_reward"])
    assert module.optimizer_steps_per_batch() == 4
    trainer = fit(module, dm, max_steps=4)
    assert trainer.global_step == 4  # one batch -> 2 passes x 2 minibatches optimizer steps
    # later updates reuse the rollout: the ratio moved away from 1 (averaged over the 4 steps)
    assert metrics_of(trainer)["train/ratio/mean"] != 1.0


def test_the_rloo_estimator_by_name_gives_leave_one_out_advantages():
    module = GRPO(arch=tiny_arch(), num_generations=4, scale_rewards="none", advantage_estimator="rloo",
                  reward_funcs=["test_grpo.length_reward"])
    r = module.make_rollout(first_batch(datamodule("prompt", batch_size=3)))
    module.compute_advantages(r)
    lengths = r.lengths.float().reshape(3, 4)
    others = (lengths.sum(1, keepdim=True) - lengths) / 3  # the mean of the group's other 3 samples
    torch.testing.assert_close(r.advantages, (lengths - others).reshape(-1))
    with pytest.raises(ValueError, match="model.advantage_estimator"):
        GRPO(arch=tiny_arch(), advantage_estimator="gae")


def test_scale_rewards_none_gives_centred_rewards():
    module = GRPO(arch=tiny_arch(), num_generations=4, scale_rewards="none", reward_funcs=["test_grpo.length_reward"])
    r = module.make_rollout(first_batch(datamodule("prompt", batch_size=3)))
    module.compute_advantages(r)
    lengths = r.lengths.float().reshape(3, 4)
    torch.testing.assert_close(r.advantages, (lengths - lengths.mean(1, keepdim=True)).reshape(-1))


# ------------------------------------------------------------------------------------ rewards
def test_rewards_are_the_weighted_sum_of_the_functions():
    module = GRPO(arch=tiny_arch(), num_generations=2, beta=0.0,
                  reward_funcs=["test_grpo.length_reward", "test_grpo.constant_reward"], reward_weights=[0.5, -2.0])
    r = module.make_rollout(first_batch(datamodule("prompt", batch_size=3)))
    assert len(r) == 6 and r.prompts[0] == r.prompts[1] != r.prompts[2]  # groups are consecutive
    assert r.columns["answer"][0] == r.columns["answer"][1]  # extra columns repeated G times
    torch.testing.assert_close(r.rewards_per_func["length_reward"], r.lengths.float())
    torch.testing.assert_close(r.rewards, 0.5 * r.lengths.float() - 2.0)


@pytest.mark.parametrize("fn, message", [("test_grpo.short_reward", "returned 7 rewards for 8 completions"),
                                         ("test_grpo.broken_reward", "raised KeyError")])
def test_a_bad_reward_function_is_named(fn, message):
    module = GRPO(arch=tiny_arch(), num_generations=2, beta=0.0, reward_funcs=[fn])
    with pytest.raises(RuntimeError, match=f"reward function {fn} .*{message}"):
        module.make_rollout(first_batch(datamodule("prompt", batch_size=4)))


@pytest.mark.parametrize("path", ["alignlab.rewards.rules.no_such_reward", "no_such_module.fn", "nodots"])
def test_an_unresolvable_reward_path_fails_at_init(path):
    with pytest.raises(ValueError, match=f"model.reward_funcs: cannot import '{path}'"):
        GRPO(arch=tiny_arch(), reward_funcs=[path])


@pytest.mark.parametrize("kw, name", [({"num_generations": 0}, "num_generations"), ({"beta": -1.0}, "beta"),
                                      ({"reward_weights": [1.0, 2.0]}, "reward_weights"),
                                      ({"loss_agg_mode": "sum"}, "loss_agg_mode"),
                                      ({"kl_estimator": "k4"}, "kl_estimator")])
def test_bad_config_names_the_argument(kw, name):
    with pytest.raises(ValueError, match=f"model.{name}"):
        GRPO(arch=tiny_arch(), **kw)


# ------------------------------------------------------------------------------- smoke + ref
EXPECTED = ["train/loss", "train/reward", "train/reward_std", "train/group_reward_std",
            "train/kl", "train/entropy", "train/clip_ratio/low",
            "train/clip_ratio/high", "train/clip_ratio/region", "train/frac_reward_zero_std",
            "completions/mean_length", "completions/min_length", "completions/max_length",
            "completions/clipped_ratio", "rewards/accuracy_reward/mean", "rewards/format_reward/mean",
            "val/accuracy"]


def test_smoke_20_steps(tmp_path):
    module = GRPO(arch=tiny_arch(), num_generations=4, lr=1e-3,
                  reward_funcs=["alignlab.rewards.rules.accuracy_reward", "alignlab.rewards.rules.format_reward"],
                  reward_weights=[1.0, 0.5], log_completions_every_n_steps=5)
    ref0, policy0 = snapshot(module.ref), snapshot(module.policy)
    assert module.ref is not None and not any(p.requires_grad for p in module.ref.parameters())
    trainer = fit(module, datamodule("prompt", batch_size=4), max_steps=20, root=tmp_path)
    assert trainer.global_step == 20
    m = metrics_of(trainer)
    for key in EXPECTED:
        assert key in m and math.isfinite(m[key]), key
    assert m["train/kl"] > 0  # the policy moved away from the reference...
    assert all(torch.equal(a, b) for a, b in zip(ref0, module.ref.parameters()))  # ...which never changed
    assert max((a - b).abs().max().item() for a, b in zip(policy0, module.policy.parameters())) > 1e-4
    events = list(tmp_path.rglob("events.out.tfevents*"))
    assert events and any(e.stat().st_size > 0 for e in events)  # completions + scalars written


def test_every_metric_reaches_the_logger_on_its_logging_steps(tmp_path):
    """Diagnostics are logged on Lightning's logging steps only (each self.log has a cost); the headline
    metrics on every step. The logger (here CSV) receives every metric at every logging step."""
    module = GRPO(arch=tiny_arch(), num_generations=4, reward_funcs=["alignlab.rewards.rules.accuracy_reward",
                                                                      "alignlab.rewards.rules.format_reward"])

    class Keys(L.Callback):
        def __init__(self):
            self.seen: list[set] = []

        def on_train_batch_end(self, trainer, *args):
            self.seen.append(set(trainer.callback_metrics))

    logger, keys = L.pytorch.loggers.CSVLogger(tmp_path, name="csv"), Keys()
    fit(module, datamodule("prompt", batch_size=4), max_steps=4, callbacks=[keys], logger=logger,
        log_every_n_steps=2, limit_val_batches=0)
    train_keys = [k for k in EXPECTED if k != "val/accuracy"] + ["train/grad_norm", "train/skipped_steps"]
    assert set(GRPO.every_step_metrics) <= keys.seen[0] and "train/kl" not in keys.seen[0]  # step 0: headline only
    assert set(train_keys) <= keys.seen[1]  # step 1: a logging step (log_every_n_steps=2)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    for step in ("1", "3"):
        logged = {k for r in rows if r["step"] == step for k, v in r.items() if v != ""}
        assert set(train_keys) <= logged, (step, set(train_keys) - logged)
    assert {r["step"] for r in rows} == {"1", "3"}


def test_beta_zero_builds_no_reference():
    assert GRPO(arch=tiny_arch(), beta=0.0).ref is None
    assert GRPO(arch=tiny_arch()).ref is not None


# ----------------------------------------------------------------------------------- learning
@learning_seeds(default_run=3)
def test_grpo_raises_validation_accuracy(scratchpad_sft_export, seed, record):
    """From the scratchpad SFT policy, GRPO learns to prefer the reliable strategy (the worked-out sum).

    Measured over seeds 0-4 at 1 and 2 threads (10 runs, results/learning/spread.md): accuracy of 4 samples per held-out prompt
    0.124 -> 0.208 +- 0.015 (smallest gain +0.071), greedy 0.362 -> 0.430 +- 0.033 (smallest +0.018),
    completions 10.6 -> 13.1 tokens. We require +0.04 sampled, greedy not lower by more than 0.02 and +1.5
    tokens; with lr ~0 nothing moves (0.124 -> 0.124) and the test fails.

    Measured (1 thread, seed 0, 100 steps of 16 prompts x 8 samples, lr 1e-4, ~20 s): validation accuracy
    0.44 -> 0.55, mean completion length 10.5 -> 13.0 tokens. We require +0.06 and longer completions.
    """
    r = rl_learning_run(GRPO, scratchpad_sft_export, record, seed=seed)
    assert r["sampled_end"] >= r["sampled_start"] + 0.04, r
    assert r["end"] >= r["start"] - 0.02, r  # greedy accuracy does not fall
    assert r["length_end"] > r["length_start"] + 1.5, r  # the scratchpad took over


@learning_seeds(default_run=0)
def test_grpo_learns_as_much_with_the_int8_sampler_and_token_tis(scratchpad_sft_export, seed, record):
    """The same run as ``test_grpo_raises_validation_accuracy`` with rollouts sampled by the int8 copy
    (``rollout_engine=int8``, model/int8.py) and corrected by token-level truncated importance sampling: the
    same margins hold (measured: docs/scaling.md, "The int8 sampler")."""
    r = rl_learning_run(GRPO, scratchpad_sft_export, record, seed=seed, rollout_engine="int8",
                        rollout_correction="token_tis")
    assert r["sampled_end"] >= r["sampled_start"] + 0.04, r
    assert r["end"] >= r["start"] - 0.02, r
    assert r["length_end"] > r["length_start"] + 1.5, r
