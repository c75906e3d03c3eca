"""Promotion in the MLflow registry (local SQLite): a better policy becomes champion, a worse one never does.

Two real policies come from real stages, once per test session (`build_candidates`): a `strong`
SFT (400 steps) and a `weak` one (1 step), with this config's data_prep and reward model, both
evaluated. Each test registers them under its own model name and runs the real `promote` flow
(Prefect's engine, run_stage, the evaluate stage's store reuse, MLflow). Only the pure decision
rule is tested on made-up numbers; the concurrency test drives the lock+decide+alias function
from separate OS processes against the real registry.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest
import yaml

from stages.common import store
from tasks import promotion as pr
from tests.conftest import small_config

# Small and quick on 2 cores: one process per stage, no ZeRO, a policy that learns something in 400 steps.
OVERRIDES = {
    "launch.nproc_per_node": 1, "launch.retries": 0, "engine.zero_stage": 0,
    "sft.steps": 400, "sft.batch_size": 64, "sft.lr": 0.01, "sft.warmup_steps": 10, "sft.log_every": 50,
    "reward_model.steps": 2, "reward_model.log_every": 1, "rl.rounds": 0,
}
WEAK_SFT_STEPS = 1


@dataclasses.dataclass
class Candidates:
    tmp: Path
    base: dict  # config as a dict (small_config + OVERRIDES)
    data: object  # StageResult
    reward_model: object
    strong: object  # StageResult of the 400-step SFT
    weak: object  # StageResult of the 1-step SFT
    strong_eval: object
    weak_eval: object

    @property
    def strong_score(self) -> float:
        return self.strong_eval.metrics["accuracy"]

    @property
    def weak_score(self) -> float:
        return self.weak_eval.metrics["accuracy"]

    def config(self, name: str, **overrides) -> Path:
        """A config file for one test: its own registered model, anything else as given."""
        data = yaml.safe_load(yaml.safe_dump(self.base))
        data["tracking"]["registered_model"] = name
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    @property
    def tracking_uri(self) -> str:
        return self.base["tracking"]["uri"]


_BUILT: dict[str, Candidates] = {}


def build_candidates(tmp_path_factory) -> Candidates:
    """Once per session: data_prep, sft (strong), reward_model, sft (weak), evaluate both."""
    if "local" in _BUILT:
        return _BUILT["local"]
    from prefect import flow

    from tasks.config import parse_config
    from tasks import tracking as mlf
    from tasks.stage import run_stage

    tmp = tmp_path_factory.mktemp("promote")
    base = small_config(tmp, **OVERRIDES)
    cfg = parse_config(base)
    weak_cfg = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"steps": WEAK_SFT_STEPS})})

    @flow(name="promote-test-candidates")
    def candidates():
        tr = mlf.start_pipeline_run(cfg, uuid.uuid4().hex, "candidates", 0)
        data = run_stage("data_prep", cfg, {}, tr)
        strong = run_stage("sft", cfg, {"data": data}, tr)
        rm = run_stage("reward_model", cfg, {"data": data, "sft": strong}, tr)
        weak = run_stage("sft", weak_cfg, {"data": data}, tr, label="[weak]")
        evals = [run_stage("evaluate", cfg, {"policy": p, "data": data, "reward_model": rm}, tr, label=f"[{n}]")
                 for n, p in (("strong", strong), ("weak", weak))]
        mlf.end_run(tr, tr.parent_run_id, "FINISHED")
        return data, rm, strong, weak, evals

    data, rm, strong, weak, (ev_strong, ev_weak) = candidates()
    c = Candidates(tmp, base, data, rm, strong, weak, ev_strong, ev_weak)
    assert c.strong_score > c.weak_score, (
        f"the test needs two policies of different quality: strong {c.strong_score}, weak {c.weak_score}")
    _BUILT["local"] = c
    return c


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_job():
    """Stage jobs inherit OMP_NUM_THREADS (job_env only sets a default): one thread each is ~20x faster
    for these tiny models on a busy 2-core machine than two fighting threads, and always gives the same
    numbers (results are bit-identical only at the same thread count)."""
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    if saved is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = saved


@pytest.fixture(scope="module")
def cands(tmp_path_factory, prefect_harness) -> Candidates:
    return build_candidates(tmp_path_factory)


def register(tracking_uri: str, name: str, artifact_uri: str, **tags) -> str:
    """A model version whose source is the artifact's checkpoint (by URI, no copy)."""
    from mlflow.exceptions import MlflowException

    from tasks import tracking as mlf

    client = mlf.client(tracking_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    return str(client.create_model_version(name, source=store.join(artifact_uri, "checkpoint"), tags=tags).version)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def set_champion(tracking_uri: str, name: str, version: str) -> None:
    from tasks import tracking as mlf

    mlf.client(tracking_uri).set_registered_model_alias(name, pr.CHAMPION, version)


def version_tags(tracking_uri: str, name: str, version: str) -> dict:
    from tasks import tracking as mlf

    return mlf.client(tracking_uri).get_model_version(name, version).tags


def copy_artifact(src_uri: str, dst_uri: str) -> None:
    """A copy of a local artifact under another key (same manifest: same digest)."""
    shutil.copytree(src_uri.removeprefix("file://"), dst_uri.removeprefix("file://"))


# --- the rule, pure ----------------------------------------------------------------------------

RULE = dict(margin=0.0, min_score=0.0, candidate_version="2", champion_version="1")


def test_decide_better_is_accepted():
    d = pr.decide(0.6, 0.5, **RULE)
    assert d.accepted and "0.6000 > champion v1 0.5000" in d.reason
    assert d.tags("abc") == {"promotion": "accepted", "promotion_reason": d.reason, "candidate_score": "0.6",
                             "champion_score": "0.5", "champion_version": "1", "eval_data_digest": "abc"}


@pytest.mark.parametrize("candidate, champion, margin, words", [
    (0.5, 0.5, 0.0, "equals champion v1"),
    (0.4, 0.5, 0.0, "is below champion v1"),
    (0.55, 0.5, 0.1, "does not beat by the margin"),
    (0.6, 0.5, 0.1, "does not beat by the margin"),  # exactly champion + margin is not enough
])
def test_decide_worse_equal_or_within_margin_is_rejected(candidate, champion, margin, words):
    d = pr.decide(candidate, champion, **{**RULE, "margin": margin})
    assert not d.accepted and words in d.reason and f"margin {margin:.4f}" in d.reason


def test_decide_min_score_and_first_version():
    first = pr.decide(0.3, None, **{**RULE, "champion_version": None, "min_score": 0.3})
    assert first.accepted and first.reason.startswith("first champion")
    assert first.tags("d")["champion_version"] == "none"
    low = pr.decide(0.29, None, **{**RULE, "champion_version": None, "min_score": 0.3})
    assert not low.accepted and "below min_score 0.3000" in low.reason
    beats_but_low = pr.decide(0.2, 0.1, **{**RULE, "min_score": 0.3})
    assert not beats_but_low.accepted and "below min_score" in beats_but_low.reason


def test_decide_first_version_must_beat_its_sft_model():
    first = {**RULE, "champion_version": None}
    for score, margin in ((0.3, 0.0), (0.25, 0.0), (0.35, 0.1)):  # equal, worse, better but within the margin
        d = pr.decide(score, None, **{**first, "margin": margin}, sft_score=0.3)
        assert not d.accepted and "does not beat its SFT model 0.3000" in d.reason, d.reason
        assert d.tags("d")["promotion"] == "rejected"
    assert not pr.decide(0.0, None, **first, sft_score=0.0).accepted  # learned nothing, as its SFT model
    ok = pr.decide(0.45, None, **{**first, "margin": 0.1}, sft_score=0.3)
    assert ok.accepted and ok.reason.startswith("first champion") and "SFT model 0.3000" in ok.reason
    assert not pr.decide(0.45, None, **{**first, "min_score": 0.5}, sft_score=0.3).accepted  # min_score still holds
    assert pr.decide(0.6, 0.5, **RULE, sft_score=0.9).accepted  # a champion exists: compared with it only
    with pytest.raises(ValueError, match="SFT model of v2 has no valid accuracy"):
        pr.decide(0.5, None, **first, sft_score=float("nan"))


def test_decide_degenerate_inputs():
    assert not pr.decide(float("nan"), 0.1, **RULE).accepted
    assert not pr.decide(None, None, **{**RULE, "champion_version": None}).accepted
    same = pr.decide(0.1, 0.9, **{**RULE, "champion_version": "2"})
    assert same.accepted and "already the champion" in same.reason
    with pytest.raises(ValueError, match="champion v1 has no valid accuracy"):
        pr.decide(0.5, None, **RULE)


# --- the flow, end to end on real stages -----------------------------------------------------


def test_first_version_becomes_champion(cands):
    from flows.promote import promote

    name = unique("first")
    v1 = register(cands.tracking_uri, name, cands.weak.uri)
    out = promote(str(cands.config(name)), v1)
    assert out["decision"] == "accepted" and out["champion_after"] == v1 and out["alias_moved"]
    assert out["champion_version"] is None and out["reason"].startswith("first champion")
    tags = version_tags(cands.tracking_uri, name, v1)
    assert tags["promotion"] == "accepted" and tags["champion_version"] == "none"
    assert float(tags["candidate_score"]) == cands.weak_score
    assert tags["eval_data_digest"] == cands.data.artifact.digest


def test_first_version_below_min_score_is_rejected(cands):
    from flows.promote import promote

    name = unique("floor")
    v1 = register(cands.tracking_uri, name, cands.strong.uri)
    out = promote(str(cands.config(name, **{"promote.min_score": 0.9})), v1)
    assert out["decision"] == "rejected" and "below min_score 0.9000" in out["reason"]
    assert out["champion_after"] is None
    assert version_tags(cands.tracking_uri, name, v1)["promotion"] == "rejected"


def test_better_candidate_is_promoted(cands):
    from mlflow.tracking import MlflowClient
    from prefect.artifacts import Artifact

    from flows.promote import promote

    name = unique("better")
    v1 = register(cands.tracking_uri, name, cands.weak.uri)
    v2 = register(cands.tracking_uri, name, cands.strong.uri)
    set_champion(cands.tracking_uri, name, v1)
    out = promote(str(cands.config(name)))  # no version given: the latest, v2
    assert out["candidate_version"] == v2 and out["decision"] == "accepted", out["reason"]
    assert out["champion_after"] == v2 and out["champion_version"] == v1
    assert (out["candidate_score"], out["champion_score"]) == (cands.strong_score, cands.weak_score)

    tags = version_tags(cands.tracking_uri, name, v2)
    assert tags["promotion"] == "accepted" and tags["champion_version"] == v1
    assert (float(tags["candidate_score"]), float(tags["champion_score"])) == (cands.strong_score, cands.weak_score)
    assert tags["eval_data_digest"] == cands.data.artifact.digest and tags["promotion_run_id"] == out["mlflow_run_id"]
    assert version_tags(cands.tracking_uri, name, v1)["superseded_by"] == v2

    # The evidence: one promotion run holding both evaluations (reused from the store: same keys).
    client = MlflowClient(cands.tracking_uri)
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["promotion.decision"] == "accepted"
    assert run.data.metrics["candidate_score"] == cands.strong_score
    children = {r.info.run_name: r for r in client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")}
    cand_eval, champ_eval = children[f"evaluate[candidate v{v2}]"], children[f"evaluate[champion v{v1}]"]
    assert cand_eval.info.run_id == out["candidate_eval_run_id"]
    assert champ_eval.info.run_id == out["champion_eval_run_id"]
    assert cand_eval.data.tags["alignflow.cached"] == champ_eval.data.tags["alignflow.cached"] == "true"
    assert {"data_prep", "sft", "reward_model"} <= children.keys()  # the config's held-out set, from the store

    md = Artifact.get(f"promotion-{name}")
    assert md is not None and md.type == "markdown"
    for needle in ("ACCEPTED", f"v{v2}", f"v{v1}", f"{cands.strong_score:.4f}", f"{cands.weak_score:.4f}",
                   out["mlflow_run_id"], out["candidate_eval_run_id"], out["champion_eval_run_id"]):
        assert needle in md.data, needle


@pytest.mark.parametrize("case", ["worse", "equal", "margin"])
def test_worse_equal_or_small_gain_is_rejected(cands, case):
    from flows.promote import promote

    name = unique(case)
    champion_src, candidate_src, margin = {
        "worse": (cands.strong, cands.weak, 0.0),
        "equal": (cands.strong, cands.strong, 0.0),  # the same checkpoint as a second version
        "margin": (cands.weak, cands.strong, 1.0),
    }[case]
    v1 = register(cands.tracking_uri, name, champion_src.uri)
    v2 = register(cands.tracking_uri, name, candidate_src.uri)
    set_champion(cands.tracking_uri, name, v1)
    out = promote(str(cands.config(name, **{"promote.margin": margin})), v2)
    words = {"worse": "is below champion", "equal": "equals champion", "margin": "does not beat by the margin"}[case]
    assert out["decision"] == "rejected" and words in out["reason"], out["reason"]
    assert out["champion_after"] == v1 and not out["alias_moved"]
    tags = version_tags(cands.tracking_uri, name, v2)
    assert tags["promotion"] == "rejected" and words in tags["promotion_reason"]
    assert tags["champion_version"] == v1 and tags["champion_score"] != "none"
    assert "superseded_by" not in version_tags(cands.tracking_uri, name, v1)


@pytest.mark.parametrize("damage", ["missing", "corrupt", "no-manifest"])
def test_invalid_candidate_is_rejected_and_champion_untouched(cands, damage):
    from flows.promote import promote

    name = unique(damage)
    bad = store.join(cands.strong.uri.rsplit("/", 1)[0], f"copy-{damage}-{uuid.uuid4().hex[:6]}")
    copy_artifact(cands.strong.uri, bad)
    weights = Path(bad.removeprefix("file://")) / "checkpoint" / "model.safetensors"
    if damage == "missing":
        weights.unlink()
        expect = "model.safetensors: missing"
    elif damage == "corrupt":  # same size, flipped bytes: only the hash can tell
        raw = bytearray(weights.read_bytes())
        raw[-64:] = bytes(b ^ 0xFF for b in raw[-64:])
        weights.write_bytes(bytes(raw))
        expect = "model.safetensors: content does not match its manifest hash"
    else:
        (weights.parent.parent / store.MANIFEST).unlink()
        expect = "no manifest"
    v1 = register(cands.tracking_uri, name, cands.weak.uri)
    v2 = register(cands.tracking_uri, name, bad)
    set_champion(cands.tracking_uri, name, v1)
    with pytest.raises(pr.CandidateInvalid, match=expect):
        promote(str(cands.config(name)), v2)
    assert pr.champion_version(pr.mlf.client(cands.tracking_uri), name) == v1
    tags = version_tags(cands.tracking_uri, name, v2)
    assert tags["promotion"] == "rejected" and expect in tags["promotion_reason"]
    assert tags["candidate_score"] == "none" and tags["champion_version"] == v1


def test_nightly_entry_point_with_stage_results_and_lineage(cands):
    """What flows/alignment.py calls after register_policy; lineage tags come from register_policy."""
    from mlflow.tracking import MlflowClient
    from prefect import flow

    from flows.promote import promote_policy
    from tasks.config import load_config
    from tasks import tracking as mlf

    name = unique("nightly")
    cfg = load_config(cands.config(name))

    @flow(name="nightly-tail")
    def nightly_tail():
        tracking = mlf.start_pipeline_run(cfg, uuid.uuid4().hex, "nightly", 0)
        _, version = mlf.register_policy(cfg, tracking, cands.strong.artifact, lineage={
            "pipeline": cfg.pipeline, "config_digest": cfg.digest(), "data_digest": cands.data.artifact.digest,
            "policy_key": cands.strong.artifact.manifest["key"]})
        out = promote_policy(cfg, tracking, version, policy=cands.strong, data=cands.data,
                             reward_model=cands.reward_model)
        mlf.end_run(tracking, tracking.parent_run_id, "FINISHED")
        return tracking, version, out

    tracking, version, out = nightly_tail()
    assert out["decision"] == "accepted" and out["champion_after"] == version
    client = MlflowClient(cands.tracking_uri)
    promo = client.get_run(out["mlflow_run_id"])
    assert promo.data.tags["mlflow.parentRunId"] == tracking.parent_run_id  # nested under the pipeline run
    assert client.get_run(out["candidate_eval_run_id"]).data.tags["mlflow.parentRunId"] == promo.info.run_id
    tags = version_tags(cands.tracking_uri, name, version)
    strong, data = cands.strong.artifact, cands.data.artifact
    assert tags["policy_digest"] == strong.digest and tags["lineage.sft"] == strong.manifest["key"]
    assert tags["lineage.data_prep"] == data.manifest["key"]
    assert (tags["data_uri"], tags["data_digest"]) == (data.uri, data.digest)
    assert tags["pipeline"] == "test-arith" and tags["config_digest"] == cfg.digest()


def test_champion_changed_during_promotion_is_evaluated_then_compared(cands, monkeypatch):
    """A concurrent promotion moves the alias after we evaluated the old champion: the gate sees it
    inside the lock, the new champion is evaluated, and the candidate is compared with it."""
    import flows.promote as fp

    name = unique("moved")
    v1 = register(cands.tracking_uri, name, cands.weak.uri)
    v2 = register(cands.tracking_uri, name, cands.strong.uri)
    v3 = register(cands.tracking_uri, name, cands.weak.uri)
    set_champion(cands.tracking_uri, name, v1)
    real, calls = fp.evaluate_version, []

    def evaluate_then_someone_promotes(cfg, run, version, role, **kw):
        if role != "champion":
            return real(cfg, run, version, role, **kw)
        calls.append(version)
        result = real(cfg, run, version, role, **kw)
        if version == v1:
            set_champion(cands.tracking_uri, name, v2)
        return result

    monkeypatch.setattr(fp, "evaluate_version", evaluate_then_someone_promotes)
    out = fp.promote(str(cands.config(name)), v3)
    assert calls == [v1, v2]
    assert out["decision"] == "rejected" and out["champion_version"] == v2 and out["champion_after"] == v2
    assert out["champion_score"] == cands.strong_score


def test_champion_checkpoint_loads_with_transformers(cands, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = unique("load")
    v1 = register(cands.tracking_uri, name, cands.strong.uri)
    set_champion(cands.tracking_uri, name, v1)
    path = pr.champion_checkpoint(cands.tracking_uri, name, tmp_path / "champion")
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    assert sum(p.numel() for p in model.parameters()) == cands.strong.metrics["num_params"]
    assert tok("12+34=")["input_ids"]
    # A version whose source is a plain directory (no manifest): MLflow's own download.
    plain = tmp_path / "plain" / "checkpoint"
    shutil.copytree(path, plain)
    v2 = register(cands.tracking_uri, name, f"file://{plain.parent}")
    set_champion(cands.tracking_uri, name, v2)
    fetched = pr.champion_checkpoint(cands.tracking_uri, name, tmp_path / "via-mlflow")
    assert (fetched / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()

    from mlflow.exceptions import MlflowException

    nochamp = unique("nochamp")
    register(cands.tracking_uri, nochamp, cands.strong.uri)
    with pytest.raises(MlflowException, match="champion"):
        pr.champion_checkpoint(cands.tracking_uri, nochamp, tmp_path / "x")


# --- the lock, against the real registry -----------------------------------------------------


def _contender(tracking_uri: str, name: str, version: str, scores: dict, ready, go, out) -> None:
    """One OS process: lock + decide + alias for one version; reports what it saw and when."""
    import time as _time

    from tasks import tracking as mlf
    from tasks.promotion import registry as promotion  # where promote_version looks up decide

    real_decide, spans = promotion.decide, []

    def slow_decide(*args, **kwargs):  # widen the critical section so an overlap would show
        start = _time.time()
        _time.sleep(0.1)
        decision = real_decide(*args, **kwargs)
        spans.append((start, _time.time()))
        return decision

    promotion.decide = slow_decide
    client = mlf.client(tracking_uri)
    client.get_registered_model(name)  # connect and import before the start line
    ready.put(version)
    go.wait(300)
    try:
        d = promotion.promote_version(client, name, version, scores[version], scores, margin=0.0, min_score=0.0,
                                      eval_data_digest="d", poll_s=0.05, lock_timeout_s=120)
        out.put((version, d.accepted, d.champion_version, spans[0]))
    except BaseException:  # reported, so the test fails with the reason
        import traceback

        out.put((version, traceback.format_exc(), None, None))


def run_contenders(tracking_uri: str, name: str, scores: dict[str, float], timeout: float = 150.0) -> list[tuple]:
    """Start one spawned process per version, release them at once, return their reports."""
    ctx = multiprocessing.get_context("spawn")
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_contender, args=(tracking_uri, name, v, scores, ready, go, out)) for v in scores]
    for p in procs:
        p.start()
    try:
        for _ in procs:  # every process imported and connected: release them together
            ready.get(timeout=timeout)
        go.set()
        reports = [out.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return reports


def check_serialised(reports: list[tuple], scores: dict[str, float]) -> None:
    """The decisions replay as one sequence: each saw the champion the previous one left."""
    for r in reports:
        assert isinstance(r[1], bool), f"v{r[0]} failed: {r[1]}"
    ordered = sorted(reports, key=lambda r: r[3][0])
    for a, b in zip(ordered, ordered[1:]):
        assert a[3][1] <= b[3][0], f"critical sections overlap: v{a[0]} {a[3]} and v{b[0]} {b[3]}"
    champion = None
    for version, accepted, seen, _ in ordered:
        assert seen == champion, f"v{version} compared against v{seen}, but the champion was v{champion}"
        if accepted:
            assert champion is None or scores[version] > scores[champion]
            champion = version


def test_concurrent_promotions_end_with_the_best(cands):
    from tasks import tracking as mlf

    name = unique("race")
    versions = [register(cands.tracking_uri, name, cands.weak.uri) for _ in range(4)]
    scores = dict(zip(versions, [0.55, 0.90, 0.10, 0.55]))
    reports = run_contenders(cands.tracking_uri, name, scores)
    check_serialised(reports, scores)
    client = mlf.client(cands.tracking_uri)
    best = max(scores, key=scores.get)
    assert pr.champion_version(client, name) == best
    assert version_tags(cands.tracking_uri, name, best)["promotion"] == "accepted"
    assert all(version_tags(cands.tracking_uri, name, v).get("promotion") for v in versions)  # all recorded
    assert not client.search_registered_models(f"name LIKE '{name}.promotion-lock%'")  # released


def test_stale_lock_is_broken_and_a_live_one_waited_for(cands):
    from tasks import tracking as mlf

    client = mlf.client(cands.tracking_uri)
    name = unique("stale")
    v1 = register(cands.tracking_uri, name, cands.weak.uri)
    lock_name = name + pr.LOCK_SUFFIX

    # A holder that died 10 minutes ago.
    client.create_registered_model(lock_name, tags={"lock.owner": "dead-host:1:x",
                                                    "lock.acquired_at": repr(time.time() - 600)})
    d = pr.promote_version(client, name, v1, 0.5, {}, margin=0.0, min_score=0.0, stale_lock_s=60, poll_s=0.05,
                           lock_timeout_s=10)
    assert d.accepted and pr.champion_version(client, name) == v1
    assert not client.search_registered_models(f"name LIKE '{lock_name}%'")

    # A live holder: we wait, give up, and change nothing.
    v2 = register(cands.tracking_uri, name, cands.strong.uri)
    live = pr.RegistryLock(client, name, stale_after_s=60, purpose="test").acquire()
    started = time.monotonic()
    with pytest.raises(pr.LockTimeout, match="is held by"):
        pr.promote_version(client, name, v2, 0.9, {v1: 0.5}, margin=0.0, min_score=0.0, lock_timeout_s=1.0,
                           stale_lock_s=60, poll_s=0.05)
    assert 1.0 <= time.monotonic() - started < 10
    assert pr.champion_version(client, name) == v1 and "promotion" not in version_tags(cands.tracking_uri, name, v2)

    # Our lock broken by someone else while we held it: we notice before touching the alias.
    live.lock.delete()
    client.create_registered_model(lock_name, tags={"lock.owner": "other", "lock.acquired_at": repr(time.time())})
    with pytest.raises(pr.LockLost):
        live.verify()
    live.release()  # does not delete the other holder's lock
    assert client.get_registered_model(lock_name).tags["lock.owner"] == "other"
    client.delete_registered_model(lock_name)

    # With the lock free again, the better candidate wins.
    assert pr.promote_version(client, name, v2, 0.9, {v1: 0.5}, margin=0.0, min_score=0.0).accepted
    assert pr.champion_version(client, name) == v2


def test_gate_refuses_a_champion_it_has_no_score_for(cands):
    from tasks import tracking as mlf

    client = mlf.client(cands.tracking_uri)
    name = unique("unscored")
    v1, v2 = (register(cands.tracking_uri, name, cands.weak.uri) for _ in range(2))
    set_champion(cands.tracking_uri, name, v1)
    with pytest.raises(pr.ChampionChanged) as info:
        pr.promote_version(client, name, v2, 0.9, {}, margin=0.0, min_score=0.0)
    assert info.value.version == v1 and pr.champion_version(client, name) == v1
    assert "promotion" not in version_tags(cands.tracking_uri, name, v2)
    assert not client.search_registered_models(f"name LIKE '{name}.promotion-lock%'")

