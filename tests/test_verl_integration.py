"""opo_kernels.integrations.verl with verl as installed from PyPI (``pip install -e ".[verl]"``).

* The estimator through verl's trainer function ``compute_advantage`` (the rewards and group
  tags it writes), and the policy loss called exactly as verl's actor loss ``ppo_loss``
  (verl/workers/utils/losses.py, verl 0.9.1) calls a registered loss, against
  ``opo_loss_from_logprobs``: loss, metrics and gradient w.r.t. log_prob.
* Every refusal, the config path verl takes (hydra compose of verl's own ppo_trainer.yaml with
  the overrides of docs/verl.md, then ``omega_conf_to_dataclass``) and the
  ``verl.plugins`` entry point.
* One real actor update on CPU in a subprocess (``verl_engine_step.py``): verl's
  ``TrainingWorker.train_mini_batch`` (what ``ActorRolloutRefWorker.update_actor`` runs) with its
  FSDP2 engine on a tiny random Qwen2, two micro-batches, its SGD step's gradient against
  autograd through ``opo_kernels.reference``. verl 0.9.1 has no ``dp_actor.DataParallelPPOActor``
  any more (the engine workers replaced it) and no CPU platform, so that script registers a
  minimal one with verl's ``set_platform``; nothing of verl's training code is replaced.

More than one data-parallel rank (the trainers' partition, the update at two ranks):
test_verl_dp.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ranks import free_port

pytestmark = pytest.mark.cpu_only  # CPU-side code / the interpreter (conftest.py)

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")

from verl.protocol import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402
from verl.workers.config import FSDPActorConfig  # noqa: E402
from verl_cases import micro_batches_of_whole_groups  # noqa: E402

import opo_kernels.integrations.verl as ov  # noqa: E402
from opo_kernels import opo_loss_from_logprobs  # noqa: E402

K = 3     # rollout.n: responses per prompt
T = 7     # response length (padded)
V = 50    # vocabulary size for the adaptive tau rule
VERL_DOC = Path(__file__).resolve().parents[1] / "docs" / "verl.md"
ENGINE_STEP = Path(__file__).with_name("verl_engine_step.py")  # the real update, own process


def actor_config(opo=None, **fields) -> FSDPActorConfig:
    """The actor config verl's worker builds (a dataclass), with our policy-loss config."""
    fields.setdefault("ppo_micro_batch_size_per_gpu", 2 * K)
    return FSDPActorConfig(strategy="fsdp", rollout_n=K, ppo_mini_batch_size=4,
                           policy_loss=ov.OPOPolicyLossConfig(opo={"vocab_size": V, **(opo or {})}),
                           **fields)


def make_batch(seed: int, prompts: int = 2, order=None):
    """A synthetic verl batch: responses of 0..T counted tokens (one empty), outcome rewards on
    the last token, advantages from the trainer's compute_advantage with our estimator."""
    g = torch.Generator().manual_seed(seed)
    num = prompts * K
    lengths = torch.randint(1, T + 1, (num,), generator=g)
    lengths[1] = 0  # a response with no counted token: excluded from its group, not an error
    mask = (torch.arange(T)[None] < lengths[:, None]).to(torch.int64)
    token_rewards = torch.zeros(num, T)
    token_rewards[torch.arange(num), (lengths - 1).clamp(min=0)] = torch.rand(num, generator=g)
    uid = np.array([f"prompt-{i // K}" for i in range(num)], dtype=object)
    group = torch.arange(num) // K
    if order is not None:  # verl's row order need not keep groups adjacent: the tags group
        mask, token_rewards, group = mask[order], token_rewards[order], group[order]
        uid = uid[order.numpy()]
    data = DataProto.from_dict(
        tensors={"token_level_rewards": token_rewards, "response_mask": mask},
        non_tensors={"uid": uid})
    data = compute_advantage(data, adv_estimator=ov.ESTIMATOR)
    logprobs = -torch.rand(num, T, generator=g) * 3
    old = logprobs + 0.3 * torch.randn(num, T, generator=g)
    return {"advantages": data.batch["advantages"], "returns": data.batch["returns"],
            "mask": mask, "rewards": token_rewards.sum(-1), "group": group,
            "logprobs": logprobs, "old": old}


def call_like_verl(config, batch, log_prob, rows=None, rollout_is_weights=None):
    """The registered loss, looked up and called as verl's ppo_loss does (keywords included)."""
    rows = slice(None) if rows is None else rows
    fn = core_algos.get_policy_loss_fn(config.policy_loss.get("loss_mode", "vanilla"))
    return fn(old_log_prob=batch["old"][rows], log_prob=log_prob,
              advantages=batch["advantages"][rows], response_mask=batch["mask"][rows].to(bool),
              loss_agg_mode=config.loss_agg_mode, config=config,
              rollout_is_weights=rollout_is_weights)


def test_registered_under_their_own_names():
    assert core_algos.get_policy_loss_fn("opo_kernels") is ov.compute_policy_loss_opo_kernels
    assert core_algos.get_adv_estimator_fn("opo_kernels") is ov.compute_opo_kernels_advantage
    # verl's "opo" (On-Policy RL with Optimal Reward Baseline) is untouched
    assert core_algos.get_adv_estimator_fn("opo") is core_algos.compute_opo_outcome_advantage


def test_entry_point_registers_on_import_verl(tmp_path):
    """verl loads the verl.plugins entry point in every process that imports it (the driver
    and each Ray worker) without anyone importing opo_kernels. (Run outside the checkout: a
    stale opo_kernels.egg-info there would shadow the installed metadata.)"""
    code = ("import sys, verl; from verl.trainer.ppo import core_algos as c; "
            "assert 'opo_kernels.integrations.verl' in sys.modules; "
            "assert 'opo_kernels' in c.POLICY_LOSS_REGISTRY; "
            "assert 'opo_kernels' in c.ADV_ESTIMATOR_REGISTRY")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path,
                   env={**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "auto"})


def test_estimator_writes_rewards_and_group_tags():
    order = torch.tensor([4, 0, 5, 2, 1, 3])  # groups interleaved
    batch = make_batch(0, order=order)
    rewards, group, size = ov.decode_advantages(batch["advantages"])
    # the reward comes back bit-exactly, and the float64 value is the reward to float32 precision
    assert torch.equal(rewards, batch["rewards"])
    torch.testing.assert_close(batch["advantages"][:, 0], batch["rewards"].double(),
                               rtol=2**-23, atol=1e-30)
    # every position of the row carries it (verl's v1 trainer keeps only the response length)
    assert torch.equal(batch["advantages"], batch["advantages"][:, :1].expand(-1, T))
    # groups numbered by first appearance; size = the group's non-empty responses
    first = {int(g): i for i, g in reversed(list(enumerate(batch["group"])))}
    expected = torch.tensor([sorted(first, key=first.get).index(int(g)) + 1
                             for g in batch["group"]])
    assert torch.equal(group, expected)
    nonempty = batch["mask"].sum(-1) > 0
    sizes = {int(g): int(nonempty[batch["group"] == g].sum()) for g in batch["group"].unique()}
    assert size.tolist() == [sizes[int(g)] for g in batch["group"]]
    torch.testing.assert_close(batch["returns"], batch["rewards"][:, None] * batch["mask"])


def test_estimator_refuses_kl_in_reward():
    """algorithm.use_kl_in_reward adds a KL penalty into token_level_rewards, which the
    estimator would sum into r_s: refused, through the trainer's own compute_advantage."""
    from verl.trainer.config import AlgoConfig

    mask = torch.ones(K, T, dtype=torch.int64)
    data = DataProto.from_dict(
        tensors={"token_level_rewards": torch.rand(K, T), "response_mask": mask},
        non_tensors={"uid": np.array(["p"] * K, dtype=object)})
    with pytest.raises(ValueError, match="use_kl_in_reward"):
        compute_advantage(data, adv_estimator=ov.ESTIMATOR,
                          config=AlgoConfig(adv_estimator=ov.ESTIMATOR, use_kl_in_reward=True))
    out = compute_advantage(data, adv_estimator=ov.ESTIMATOR,
                            config=AlgoConfig(adv_estimator=ov.ESTIMATOR))
    assert out.batch["advantages"].dtype == torch.float64


@pytest.mark.parametrize("value, match", [
    (float("nan"), "non-finite reward"), (float("inf"), "non-finite reward"),
    (1e39, "beyond float32's range")])
def test_estimator_refuses_rewards_it_cannot_carry(value, match):
    """A response's summed reward must be a finite float32 (the tag rides below its
    precision): NaN and inf are non-finite; a finite float64 sum past float32's range says so."""
    rewards = torch.rand(K, T, dtype=torch.float64)
    rewards[1, 0] = value
    with pytest.raises(ValueError, match=match):
        ov.compute_opo_kernels_advantage(rewards, torch.ones(K, T), index=np.array(["p"] * K))


def test_verls_advantage_metrics_read_rewards():
    """The trainer's compute_data_metrics takes the float64 advantages as they are: its
    critic/advantages/* statistics are those of the rewards over response tokens."""
    from verl.trainer.ppo.metric_utils import compute_data_metrics
    batch = make_batch(0)
    num, mask = 2 * K, batch["mask"]
    data = DataProto.from_dict(tensors={
        "token_level_scores": torch.zeros(num, T), "token_level_rewards": torch.zeros(num, T),
        "advantages": batch["advantages"], "returns": batch["returns"],
        "prompts": torch.ones(num, 3, dtype=torch.long),
        "responses": torch.ones(num, T, dtype=torch.long), "response_mask": mask,
        "attention_mask": torch.cat([torch.ones(num, 3, dtype=torch.long), mask], 1)})
    metrics = compute_data_metrics(data, use_critic=False)
    per_token = batch["rewards"][:, None].expand(-1, T)[mask.bool()]
    assert metrics["critic/advantages/mean"] == pytest.approx(per_token.mean().item(), rel=1e-6)
    assert metrics["critic/advantages/max"] == pytest.approx(per_token.max().item(), rel=1e-6)
    assert metrics["critic/advantages/min"] == pytest.approx(per_token.min().item(), rel=1e-6)


OPTION_CASES = {
    "defaults": {},
    "token-log-escort": {"level": "token", "coordinates": "log", "weights": "escort",
                         "alpha": 0.3, "mu": 0.5},
    "sequence-centered-fixed-tau": {"level": "sequence", "center_weights": True,
                                    "adaptive_tau": False, "tau": 0.8, "tau_range": [0.1, 2.0]},
    "author-preset": {"preset": "author_verl", "alpha": 0.5},
}


@pytest.mark.parametrize("interleaved", [False, True], ids=["adjacent", "interleaved"])
@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_loss_equals_opo_loss_from_logprobs(case, interleaved):
    options = OPTION_CASES[case]
    order = torch.tensor([3, 0, 4, 1, 5, 2]) if interleaved else None
    batch = make_batch(1, order=order)
    config = actor_config(opo=options)
    # what ppo_loss writes before calling the loss, for one rank and this micro-batch only
    config.global_batch_info.update(dp_size=1, batch_num_tokens=int(batch["mask"].sum()),
                                    global_batch_size=batch["mask"].shape[0],
                                    loss_scale_factor=None)
    upstream = 0.7  # a non-unit upstream gradient
    lp = batch["logprobs"].clone().requires_grad_()
    loss, metrics = call_like_verl(config, batch, lp)
    (upstream * loss).backward()

    lp_ref = batch["logprobs"].clone().requires_grad_()
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    ref, ref_metrics = opo_loss_from_logprobs(
        lp_ref, batch["old"], batch["rewards"], mask=batch["mask"].bool(),
        group_ids=batch["group"], vocab_size=V, return_metrics=True, **opts)
    (upstream * ref).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lp.grad, lp_ref.grad, rtol=1e-6, atol=1e-7)
    assert lp.grad[batch["mask"] == 0].abs().max() == 0
    for key, value in ref_metrics.items():
        assert metrics[f"actor/opo_{key}"] == pytest.approx(float(value), rel=1e-6, abs=1e-7)


def test_scale_is_verls_global_batch_normalisation():
    """loss · rows · dp_size / global_batch_size: summed over micro-batches and averaged over
    ranks it is the rows-weighted mean of the micro-batch OPO losses."""
    batch = make_batch(2, prompts=2)
    config = actor_config()
    base, _ = call_like_verl(config, batch, batch["logprobs"])
    config.global_batch_info.update(dp_size=2, global_batch_size=4 * 2 * K)
    scaled, _ = call_like_verl(config, batch, batch["logprobs"])
    torch.testing.assert_close(scaled, base * (2 * K) * 2 / (4 * 2 * K))
    config.global_batch_info.update(global_batch_size=None)
    with pytest.raises(ValueError, match="global_batch_size is required"):
        call_like_verl(config, batch, batch["logprobs"])


REFUSED_ACTOR = {
    "shuffle": ({"shuffle": True}, "actor.shuffle"),
    "micro-not-multiple": ({"ppo_micro_batch_size_per_gpu": 4}, "not a multiple of rollout.n=3"),
    "kl-loss": ({"use_kl_loss": True}, "use_kl_loss"),
    "entropy-not-token-mean": ({"entropy_coeff": 0.01, "loss_agg_mode": "seq-mean-token-mean"},
                               "loss_agg_mode=token-mean"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_ACTOR))
def test_refuses_actor_settings(case):
    fields, match = REFUSED_ACTOR[case]
    batch = make_batch(3)
    with pytest.raises(ValueError, match=match):
        call_like_verl(actor_config(**fields), batch, batch["logprobs"])


def test_dynamic_bsz_is_accepted_when_verl_keeps_groups(monkeypatch):
    """use_dynamic_bsz: micro-batches cut by token count between whole groups (verl's
    force_group_size, set by data_parallel.py), so the fixed micro-batch size is not checked;
    a verl without force_group_size is refused, naming the key."""
    from opo_kernels.integrations.verl import policy_loss

    batch = make_batch(3)
    config = actor_config(use_dynamic_bsz=True, ppo_micro_batch_size_per_gpu=4)
    call_like_verl(config, batch, batch["logprobs"])
    monkeypatch.setattr(policy_loss, "dynamic_batches_keep_groups", lambda: False)
    with pytest.raises(ValueError, match=r"use_dynamic_bsz=True .*\(no force_group_size\)"):
        call_like_verl(config, batch, batch["logprobs"])


def test_entropy_coeff_with_token_mean_is_accepted():
    """verl adds −entropy_coeff·agg_loss(entropy, token-mean): exactly the entropy bonus of
    docs/spec.md."""
    batch = make_batch(3)
    call_like_verl(actor_config(entropy_coeff=0.01), batch, batch["logprobs"])


def test_refuses_a_group_split_across_micro_batches():
    batch = make_batch(4)
    # rows 0..3: group 1 complete (its empty response does not count), group 2 has 1 of 3
    with pytest.raises(ValueError, match=r"has 1 of its 3 non-empty responses"):
        call_like_verl(actor_config(), batch, batch["logprobs"][:4], rows=slice(0, 4))


def test_refuses_advantages_of_another_estimator():
    batch = make_batch(5)
    grpo, _ = core_algos.compute_grpo_outcome_advantage(
        torch.rand(2 * K, T), batch["mask"], np.repeat(np.arange(2), K))
    with pytest.raises(ValueError, match="adv_estimator=opo_kernels"):
        call_like_verl(actor_config(), {**batch, "advantages": grpo}, batch["logprobs"])
    with pytest.raises(ValueError, match="carry no group tag"):
        call_like_verl(actor_config(), {**batch, "advantages": grpo.double()}, batch["logprobs"])


def test_refuses_rollout_correction_weights():
    batch = make_batch(6)
    with pytest.raises(ValueError, match="rollout_correction"):
        call_like_verl(actor_config(), batch, batch["logprobs"],
                       rollout_is_weights=torch.ones(2 * K, T))


@pytest.mark.parametrize("opo, match", [
    ({"alpha": 2.0}, "alpha must be in"),
    ({"not_an_option": 1}, "unknown option"),
    ({"temperature": 0.7}, "rollout.temperature"),
    ({"entropy_coef": 0.01}, "actor.entropy_coeff"),
    ({"vocab_size": 0}, "vocab_size must be a positive int"),
], ids=["alpha", "unknown", "temperature", "entropy_coef", "vocab_size"])
def test_bad_opo_options_fail_when_verl_builds_the_config(opo, match):
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass
    node = OmegaConf.create({"_target_": "opo_kernels.integrations.verl.OPOPolicyLossConfig",
                             "opo": opo})
    with pytest.raises(Exception, match=match):  # hydra wraps it in InstantiationException
        omega_conf_to_dataclass(node)


def test_adaptive_tau_needs_a_vocabulary_size():
    batch = make_batch(7)
    config = FSDPActorConfig(strategy="fsdp", rollout_n=K, ppo_micro_batch_size_per_gpu=2 * K,
                             policy_loss=ov.OPOPolicyLossConfig())
    with pytest.raises(ValueError, match="vocab_size"):
        call_like_verl(config, batch, batch["logprobs"])


def _readme_overrides() -> list:
    """The verl overrides of the command in docs/verl.md, section "verl"."""
    section = VERL_DOC.read_text(encoding="utf-8").split("\n## verl\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    block = next(b for b in re.findall(r"```bash\n(.*?)```", section, re.S)
                 if "verl.trainer.main_ppo" in b)
    words = shlex.split(block.replace("\\\n", " "), comments=True)
    return [w for w in words if "=" in w and not w.startswith("-")]


def test_readme_config_builds_the_actor_config_verl_uses():
    """Compose verl's own ppo_trainer.yaml with the documented overrides and build the actor
    config as verl's worker does: our policy-loss config, the paper's options, and none of the
    refused settings."""
    import verl
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    overrides = _readme_overrides()
    assert "algorithm.adv_estimator=opo_kernels" in overrides
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    assert cfg.actor_rollout_ref.rollout.n == 6
    assert cfg.algorithm.use_kl_in_reward is False
    # verl needs it when use_dynamic_bsz=false (it computes old_log_prob in micro-batches)
    assert cfg.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu == 12
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, ov.OPOPolicyLossConfig)
    assert actor.policy_loss.loss_mode == "opo_kernels"
    options = dict(actor.policy_loss.opo)
    assert (options["alpha"], options["mu"], options["adaptive_tau"]) == (0.6, 1.0, True)
    ov.check_actor_config(actor, actor.loss_agg_mode)  # no refusal, in the workers ...
    ov.check_actor_config(cfg.actor_rollout_ref.actor, actor.loss_agg_mode)  # ... or the trainer
    assert actor.rollout_n == 6 and actor.ppo_micro_batch_size_per_gpu % 6 == 0


def test_core_package_does_not_import_verl():
    code = "import sys, opo_kernels; assert 'verl' not in sys.modules, 'opo_kernels imported verl'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------ one real actor update on CPU


@pytest.mark.parametrize("max_tokens", [None, 30], ids=["fixed-micro", "dynamic-bsz"])
def test_real_update_step_gradient_equals_reference(tmp_path, max_tokens):
    """verl's actor update (TrainingWorker.train_mini_batch -> FSDP2 engine -> ppo_loss -> our
    loss -> backward -> SGD step) on a tiny Qwen2: the step's gradient, (θ_before −
    θ_after)/lr, equals the gradient of Σ_mb rows/global_batch_size · OPO(mb) computed by
    autograd through opo_kernels.reference on a plain HF forward of the same weights.
    dynamic-bsz: use_dynamic_bsz with 30 tokens per micro-batch (a group of 3 responses holds
    up to 27) and the force_group_size the patched _update_actor adds: verl's own cut, whole
    groups of different numbers per micro-batch."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    out = tmp_path / "result.json"
    args = [] if max_tokens is None else [str(max_tokens)]
    proc = subprocess.run([sys.executable, str(ENGINE_STEP), str(tmp_path), str(out), *args],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())
    sizes = sorted(len(rows) for rows in result["micro_batches"])
    assert micro_batches_of_whole_groups(result["micro_batches"]), result["micro_batches"]
    if max_tokens is not None:  # the token budget cut micro-batches of unequal sizes
        assert len(sizes) > 1 and sizes[0] < sizes[-1], result["micro_batches"]
    assert result["loss_engine"] == pytest.approx(result["loss_reference"], rel=1e-6)
    # fp32 parameters: one SGD step at lr = 1000 rounds (θ_before − θ_after)/lr to ~1e-7 of
    # the gradient (measured: at most 1.1e-6 of a tensor's max|grad|)
    assert result["worst_rel_error"] < 2e-5, result["errors"]
    assert result["grad_norm"] > 0
