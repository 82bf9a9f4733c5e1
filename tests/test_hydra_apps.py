"""The Hydra side: conf/ builds the server's split, and the train app runs a Trainer through it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightning_split import apps
from lightning_split.channel import client_tls
from lightning_split.split.build import ModelSource, build_model
from lightning_split.split.connect import open_split
from lightning_split.split.spec import SplitSpec

CONF = str(Path(apps.__file__).resolve().parent / "conf")


def _compose(name: str, overrides: list[str]):  # noqa: ANN202
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize(("model", "placement"), [
    ("gpt2_tiny", []), ("mlp_digits", []),
    # several devices ("cpu" twice: the options' path from serve.yaml to the service)
    ("gpt2_tiny", ["server.devices=[cpu,cpu]"]),
    ("gpt2_tiny", ["server.devices=[cpu,cpu]", "server.placement=replicate"]),
], ids=["gpt2_tiny", "mlp_digits", "gpt2_tiny-spread", "gpt2_tiny-replicate"])
def test_server_from_hydra_config_matches_local(model, placement, pki, tmp_path):
    cfg = _compose("serve", [f"model={model}", "server.address=127.0.0.1:0", f"server.certs={pki}",
                             f"server.state_dir={tmp_path}", *placement])
    server = apps.build_server(cfg)
    assert len(server.handler.replicas.all) == (2 if "server.placement=replicate" in placement else 1)
    try:
        source = ModelSource.from_dict(OmegaConf.to_container(cfg.model.source))
        spec = SplitSpec.from_dict(OmegaConf.to_container(cfg.model.split))
        remote = open_split(f"127.0.0.1:{server.port}", "alice", client_tls(pki, "alice"), source=source, spec=spec)
        local = build_model(source).eval()
        if model == "gpt2_tiny":
            ids = torch.randint(0, 512, (2, 12))
            got = remote.model.eval()(input_ids=ids, labels=ids, result="logits")
            want = local(input_ids=ids, labels=ids)
            torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
        else:
            x = torch.rand(5, 64)
            torch.testing.assert_close(remote.model.eval()(x), local(x), atol=1e-5, rtol=1e-5)
        remote.close()
    finally:
        server.stop(grace=0)


def test_train_app_runs_a_trainer_through_the_server(pki, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    serve_cfg = _compose("serve", ["server.address=127.0.0.1:0", f"server.certs={pki}", f"server.state_dir={tmp_path}"])
    server = apps.build_server(serve_cfg)
    try:
        cfg = _compose("train", [f"client.address=127.0.0.1:{server.port}", f"client.certs={pki}",
                                 "client.node_id=alice", "trainer.max_epochs=1", "+trainer.limit_train_batches=20",
                                 "+trainer.logger=false", "+trainer.enable_checkpointing=false"])
        metrics = apps.train(cfg)
        assert metrics["val_acc"] > 0.3  # 20 Adam steps on digits, through the server's trainable blocks
    finally:
        server.stop(grace=0)


def _train_with_logs(pki, tmp_path, train_batches: int, callbacks: str) -> None:  # noqa: ANN001
    """The train app for ``train_batches`` steps against a served digits model, its Lightning logs
    in ``tmp_path/logs`` (a CSVLogger, composed the Hydra way), with ``+trainer.callbacks=...``."""
    server = apps.build_server(_compose("serve", ["server.address=127.0.0.1:0", f"server.certs={pki}",
                                                  f"server.state_dir={tmp_path}"]))
    try:
        apps.train(_compose("train", [
            f"client.address=127.0.0.1:{server.port}", f"client.certs={pki}", "client.node_id=alice",
            "trainer.max_epochs=1", f"+trainer.limit_train_batches={train_batches}", "+trainer.limit_val_batches=1",
            "+trainer.enable_checkpointing=false",
            "+trainer.logger._target_=lightning.pytorch.loggers.CSVLogger", f"+trainer.logger.save_dir={tmp_path}/logs",
            f"+trainer.callbacks={callbacks}"]))
    finally:
        server.stop(grace=0)


def test_train_app_takes_a_logger_and_callbacks_the_hydra_way(pki, tmp_path, monkeypatch):
    """``+trainer.logger._target_=...`` and ``+trainer.callbacks=[...]`` become objects (they were
    passed to the Trainer as dicts and strings)."""
    monkeypatch.chdir(tmp_path)
    _train_with_logs(pki, tmp_path, 3, "[{_target_: lightning.pytorch.callbacks.LearningRateMonitor}]")
    assert list((tmp_path / "logs").rglob("metrics.csv")), "the CSVLogger wrote nothing"


def test_the_privacy_report_is_a_hydra_callback(pki, tmp_path, monkeypatch):
    """``PrivacyReport`` with public data from ``lightning_split.privacy.public``, composed the Hydra
    way, reports on the train app's own run (the digits model: inputs reconstructed)."""
    import json

    monkeypatch.chdir(tmp_path)
    _train_with_logs(pki, tmp_path, 12, "[{_target_: lightning_split.privacy.PrivacyReport, attack_steps: 100,"
                                        " public: {_target_: lightning_split.privacy.public.digits}}]")
    reports = list((tmp_path / "logs").rglob("privacy_report.json"))
    assert reports, "no privacy report beside the logs"
    inversion = json.loads(reports[0].read_text())["inversion"]
    assert inversion["kind"] == "inputs" and inversion["reconstruction_mse"] < inversion["baseline_mse"]


RECIPES = str(apps.RECIPES)


@pytest.mark.parametrize("recipe,serve_model", [("gpt2_lora_client", "gpt2_tiny"),
                                                ("digits_frozen_tail_client", "mlp_digits")])
def test_recipes_train_through_a_server(recipe, serve_model, pki, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server = apps.build_server(_compose("serve", [f"model={serve_model}", "server.address=127.0.0.1:0",
                                                  f"server.certs={pki}", f"server.state_dir={tmp_path}"]))
    try:
        with initialize_config_dir(config_dir=RECIPES, version_base=None):
            cfg = compose(config_name=recipe, overrides=[
                f"hydra.searchpath=[file://{CONF}]", f"client.address=127.0.0.1:{server.port}",
                f"client.certs={pki}", "client.node_id=alice", "trainer.max_epochs=1",
                "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=2", "+trainer.logger=false",
                "+trainer.enable_checkpointing=false"])
        metrics = apps.train(cfg)
        assert metrics["val_loss"] > 0
        assert cfg.client.tail.mode in ("lora", "frozen")
    finally:
        server.stop(grace=0)


def test_serve_command_starts_serves_and_stops(pki, tmp_path):
    """``lightning-split serve`` in its own process: it says where it listens and with how many
    torch threads (server.torch_threads), serves a client over mutual TLS, and stops on SIGTERM."""
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "lightning_split.cli", "serve", "server.address=127.0.0.1:0", f"server.certs={pki}",
           f"server.state_dir={tmp_path / 'state'}", f"hydra.run.dir={tmp_path / 'run'}", "server.torch_threads=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = next(line for line in proc.stdout if "lightning-split: serving" in line)
        assert "with mutual TLS" in line and "1 torch thread(s)" in line
        port = int(line.split(" on 127.0.0.1:")[1].split()[0].rstrip(","))
        remote = open_split(f"127.0.0.1:{port}", "alice", client_tls(pki, "alice"))
        try:
            x = torch.randn(4, 64)
            with torch.no_grad():
                out = remote.model.eval()(x)
            assert out.shape[0] == 4 and torch.isfinite(out).all()
        finally:
            remote.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_client_and_server_on_one_host_share_its_cores(monkeypatch):
    """Both local: each takes half the cores by default; a server bound for other hosts, or a given
    number, is left as said."""
    import torch

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    before = torch.get_num_threads()
    try:
        assert apps.share_cores(None, "127.0.0.1:50051") == 4
        assert apps.share_cores(None, "localhost:50051") == 4
        assert apps.share_cores(3, "127.0.0.1:50051") == 3
        torch.set_num_threads(before)
        assert apps.share_cores(None, "10.0.0.5:50051") == before
    finally:
        torch.set_num_threads(before)



def test_recipes_and_configs_are_found_by_name_from_any_directory(tmp_path):
    """Configs and recipes ship inside the package: from a directory without ``conf/`` the train
    command composes a recipe by its name, overrides after it as usual."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "lightning_split.cli", "train", "--config-name", "gpt2_lora_client",
           "client.node_id=alice", "--cfg", "job"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    job = OmegaConf.create(out.stdout)
    assert job.client.node_id == "alice" and job.client.tail.mode == "lora" and job.model.source.target.endswith(
        "GPT2LMHeadModel")


def test_the_console_script_helps_without_importing_torch_or_lightning():
    """``lightning-split --help`` and ``certs`` need neither: they took 9-14 s when the package's
    import pulled both in (lightning_split/__init__.py loads them when a command uses them)."""
    import subprocess
    import sys

    probe = ("import sys; from lightning_split import cli; cli.main(['--help']); "
             "print('HEAVY', sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_the_strategy_registers_when_lightning_is_imported_after_it():
    """A server never imports Lightning (7 of its 10 seconds of imports), and ``Trainer(strategy="split")``
    still resolves in a program that imports Lightning after ``lightning_split`` (the test process
    itself imports Lightning first: ``test_strategy_features.py`` resolves the name there)."""
    import subprocess
    import sys

    probe = ("import sys; import lightning_split.server.service; before = 'lightning.pytorch' in sys.modules; "
             "import lightning as L; from lightning.pytorch.strategies import StrategyRegistry; "
             "print('LIGHTNING', before, 'split' in StrategyRegistry)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "LIGHTNING False True" in out.stdout, out.stdout + out.stderr


def test_multirun_jobs_keep_their_logs_apart(pki, tmp_path):
    """``lightning-split train -m seed=0,1``: the two jobs train one after the other through the
    same server, and each writes its Lightning logs under its own job folder (not ./lightning_logs)."""
    import subprocess
    import sys

    server = apps.build_server(_compose("serve", ["server.address=127.0.0.1:0", f"server.certs={pki}",
                                                  f"server.state_dir={tmp_path / 'state'}"]))
    try:
        sweep = tmp_path / "sweep"
        cmd = [sys.executable, "-m", "lightning_split.cli", "train", "-m", "seed=0,1",
               f"client.address=127.0.0.1:{server.port}", f"client.certs={pki}", "client.node_id=alice",
               "client.torch_threads=1", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
               "+trainer.limit_val_batches=1", "+trainer.enable_checkpointing=false", f"hydra.sweep.dir={sweep}"]
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        for job in ("0", "1"):
            logs = sweep / job / "lightning_logs" / "version_0"  # Lightning's default logger, in the job's folder
            assert logs.is_dir() and any(logs.iterdir()), f"job {job} logged nothing in its own folder"
        assert not (tmp_path / "lightning_logs").exists()
    finally:
        server.stop(grace=0)
