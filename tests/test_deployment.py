"""Deployment across sites, on 127.0.0.1: what README "Deploying across sites" describes.

A SuperLink with TLS (a throwaway CA and server certificate made with the guide's openssl
commands) and SuperNode authentication; site keys registered with ``flwr supernode
register``; one SuperNode per site, each reading its own JSONL file (``data-path``); a CLUES
run with ``flwr run`` to the end. A SuperNode whose key is not registered is refused, and a
site killed in the middle of a tuning round is named in the run's failures while the run
goes on with the others. Every process the tests start is stopped by PID, even on failure.
"""

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clues_flwr.core.data import split_heldout
from clues_flwr.demo.dataset import demo_splits
from clues_flwr.model import demo_model_path

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CONNECTION = "clues"  # the SuperLink connection's name in $FLWR_HOME/config.toml
RECORDS_PER_SITE = 60
RUN_CONFIG = (
    "trace-rounds=1 local-steps=2 test-size=20 heldout-fraction=0.1 seed=0 min-available-nodes=2 min-train-nodes=2"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_checked(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 60) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def make_certificates(folder: Path) -> None:
    """A CA and a SuperLink certificate for localhost, 127.0.0.1 and this host's name, with
    the README's openssl commands."""
    assert shutil.which("openssl"), "this test runs the README's openssl commands: install openssl"
    folder.mkdir()
    extensions = (
        f"subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:{socket.gethostname()}\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    (folder / "server.ext").write_text(extensions)
    for cmd in (
        "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out ca.key",
        "openssl req -x509 -new -key ca.key -sha256 -days 365 -subj /CN=clues-flwr-CA"
        " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign -out ca.crt",
        "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out server.key",
        "openssl req -new -key server.key -subj /CN=superlink -out server.csr",
        "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256"
        " -extfile server.ext -out server.pem",
    ):
        run_checked(cmd.split(), folder)


def make_site_key(path: Path) -> None:
    """A site's ECDSA P-384 key pair in OpenSSH format: ``path`` (private) and ``path.pub``,
    with the README's ssh-keygen command, or the same files from ``cryptography``."""
    if shutil.which("ssh-keygen"):
        run_checked(["ssh-keygen", "-t", "ecdsa", "-b", "384", "-N", "", "-f", path.name, "-C", "", "-q"], path.parent)
        return
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    path.with_suffix(".pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 15) -> None:
    """Stop a process this test started and every process it started, by PID."""
    try:
        root = psutil.Process(proc.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:  # what is left of its process group (e.g. a child whose parent exited)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=30)


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"


def wait_healthy(port: int, ca: Path, log: Path, proc: subprocess.Popen | None = None) -> None:
    """The SuperLink up, and serving TLS with a certificate the CA vouches for, for 127.0.0.1."""
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=2, context=context):
                return
        except OSError:
            assert proc is None or proc.poll() is None, "flower-superlink exited at start:\n" + tail(log)
            assert time.monotonic() < deadline, "flower-superlink did not come up:\n" + tail(log)
            time.sleep(0.5)


@dataclass
class Site:
    name: str
    node_id: int
    proc: subprocess.Popen
    log: Path
    records: list


class Deployment:
    """The SuperLink, the sites' SuperNodes and the operator's ``flwr`` CLI, in one folder."""

    def __init__(self, base: Path):
        self.base = base
        self.env = {**os.environ, "FLWR_HOME": str(base / "flwr-home"), "PYTHONUNBUFFERED": "1"}
        self.procs: list[subprocess.Popen] = []
        self.sites: dict[str, Site] = {}
        self.pools = demo_splits(num_clients=3, pool_size=RECORDS_PER_SITE, test_size=20).pools
        self.certs = base / "certificates"
        self.port = free_port()

    def spawn(self, name: str, cmd: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.base / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                cmd, cwd=self.base, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        return proc, log

    def start_superlink(self, log_name: str = "superlink") -> None:
        """Start (or, after a crash, restart on the same port and database) the SuperLink."""
        if not self.certs.exists():
            make_certificates(self.certs)
        home = self.base / "flwr-home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n'
        )
        self.superlink, self.superlink_log = self.spawn(
            log_name,
            [
                "flower-superlink",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--ssl-ca-certfile",
                str(self.certs / "ca.crt"),
                "--ssl-certfile",
                str(self.certs / "server.pem"),
                "--ssl-keyfile",
                str(self.certs / "server.key"),
                "--enable-supernode-auth",
                "--database",
                str(self.base / "state.db"),
                "--disable-runtime-dependency-installation",
            ],
        )
        wait_healthy(self.port, self.certs / "ca.crt", self.superlink_log, self.superlink)

    def flwr(self, *args: str, timeout: float = 60) -> str:
        return run_checked(["flwr", *args], self.base, self.env, timeout)

    def nodes(self) -> dict[int, str]:
        """Node ID → status (registered, online, offline, ...) as the SuperLink lists them."""
        out = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        return {int(n["node-id"]): n["status"] for n in json.loads(out[out.index("{") :])["nodes"]}

    def wait_status(self, node_ids: set[int], status: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.nodes().get(n) == status for n in node_ids):
            assert time.monotonic() < deadline, f"nodes {sorted(node_ids)} not {status} in {timeout}s: {self.nodes()}"
            time.sleep(1)

    def key(self, name: str) -> Path:
        keys = self.base / "keys"
        keys.mkdir(exist_ok=True)
        make_site_key(keys / name)
        return keys / name

    def start_supernode(self, name: str, key: Path, data: Path, node_config: str = "") -> tuple[subprocess.Popen, Path]:
        return self.spawn(
            name,
            [
                "flower-supernode",
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--root-certificates",
                str(self.certs / "ca.crt"),
                "--auth-supernode-private-key",
                str(key),
                "--node-config",
                f'data-path="{data}" min-heldout=5 {node_config}'.strip(),  # 6 held-out records a site
                "--port",
                str(free_port()),  # the SuperNode's local Runtime API; one per SuperNode on a machine
            ],
        )

    def site(self, index: int) -> Site:
        """Site ``index`` (1-based): its data file, key, registration and SuperNode, online."""
        name = f"site{index}"
        if name not in self.sites:
            records = self.pools[index - 1]
            data = self.base / f"{name}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in records))
            key = self.key(name)
            out = self.flwr("supernode", "register", str(key.with_suffix(".pub")), CONNECTION, "--format", "json")
            node_id = int(json.loads(out[out.index("{") :])["node-id"])
            proc, log = self.start_supernode(name, key, data)
            self.sites[name] = Site(name, node_id, proc, log, records)
            self.wait_status({node_id}, "online")
        return self.sites[name]

    def run_app(self, run_config: str, log: Path) -> subprocess.Popen:
        """``flwr run`` of this project against the deployment, streaming into ``log``."""
        with log.open("w") as out:
            proc = subprocess.Popen(
                ["flwr", "run", str(ROOT), CONNECTION, "--stream", "--run-config", run_config],
                cwd=self.base,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):  # the CLI and SuperNodes first, the SuperLink last
            stop(proc)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    dep = Deployment(tmp_path_factory.mktemp("deployment"))
    try:
        dep.start_superlink()
        yield dep
    finally:
        dep.close()


def finished_run(proc: subprocess.Popen, log: Path, timeout: float = 600) -> tuple[str, Path]:
    """Wait for ``flwr run`` to end; its output and the run folder it printed."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish in {timeout}s:\n{tail(log)}")
    out = log.read_text(errors="replace")
    found = re.search(r"\[clues\] run folder: (\S+)", out)
    assert proc.returncode == 0 and found, f"flwr run ended with {proc.returncode} and no run folder:\n{out[-4000:]}"
    return out, Path(found.group(1))


def test_two_registered_sites_run_clues_over_tls_and_an_unregistered_key_is_refused(deployment):
    site1, site2 = deployment.site(1), deployment.site(2)
    before = deployment.nodes()
    assert before[site1.node_id] == before[site2.node_id] == "online"

    intruder, intruder_log = deployment.start_supernode(
        "intruder", deployment.key("intruder"), deployment.base / "site1.jsonl"
    )
    try:
        intruder.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a SuperNode with an unregistered key was not refused within 60s:\n" + tail(intruder_log))
    assert intruder.returncode != 0
    assert "Failed to activate SuperNode" in tail(intruder_log), tail(intruder_log)
    assert "No SuperNode found with the given public key" in deployment.superlink_log.read_text(errors="replace")
    assert deployment.nodes() == before  # no node was added or changed

    runs = deployment.base / "runs"
    proc = deployment.run_app(f"{RUN_CONFIG} num-server-rounds=2 output-dir='{runs}'", deployment.base / "run.log")
    out, run_dir = finished_run(proc, deployment.base / "run.log")
    assert run_dir.parent == runs and run_dir.is_dir()
    assert (run_dir / "adapter").is_dir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2], out[-3000:]
    assert metrics["failures"] == [], metrics["failures"]
    assert {"train-loss", "heldout-loss", "test-loss"} <= set(metrics["rounds"][-1])
    selection = json.loads((run_dir / "selection.json").read_text())
    assert set(selection["clients"]) == {str(site1.node_id), str(site2.node_id)}
    for site in (site1, site2):  # each SuperNode scored the records of its own file
        train, _ = split_heldout(site.records, 0.1, seed=0)
        assert selection["clients"][str(site.node_id)]["total"] == len(train)


def test_a_site_killed_during_a_tuning_round_is_named_and_the_run_goes_on(deployment):
    survivors = [deployment.site(1), deployment.site(2)]
    victim = deployment.site(3)
    deployment.wait_status({s.node_id for s in [*survivors, victim]}, "online")
    try:
        runs = deployment.base / "runs-fault"
        log = deployment.base / "run-fault.log"
        proc = deployment.run_app(f"{RUN_CONFIG} num-server-rounds=1 output-dir='{runs}'", log)
        # Its second train message (train.clues_trace, then train) is the first tuning round
        # (trace-rounds=1): kill the whole SuperNode (SuperNode, SuperExec, ClientApp) without
        # warning as soon as it has it.
        deadline = time.monotonic() + 300
        while tail(victim.log, 10**7).count("Receiving: train") < 2:
            assert proc.poll() is None, "flwr run ended before the tuning round:\n" + tail(log)
            assert time.monotonic() < deadline, "the tuning round never reached site3:\n" + tail(victim.log)
            time.sleep(0.2)
        stop(victim.proc, signal.SIGKILL)

        out, run_dir = finished_run(proc, log)
        assert "[clues] tune:" in out
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert [r["round"] for r in metrics["rounds"]] == [0, 1], out[-3000:]
        assert "train-loss" in metrics["rounds"][1], "the tuning round was not aggregated from the two other sites"
        dead = [f for f in metrics["failures"] if f["node"] == victim.node_id]
        assert dead and "tune" in dead[0]["where"] and "Unavailable" in dead[0]["reason"], metrics["failures"]
        assert all(f["node"] == victim.node_id for f in metrics["failures"]), metrics["failures"]
        summary = [line for line in out.splitlines() if "[clues]" in line and "failure" in line]
        assert dead[0]["site"] == f"node {victim.node_id}", "no label set: named by its node ID on both sides"
        assert summary and f"{dead[0]['site']}: " in summary[-1], out[-3000:]
        selection = json.loads((run_dir / "selection.json").read_text())
        assert len(selection["clients"]) == 3  # all three were scored before the kill
        assert deployment.nodes()[victim.node_id] == "offline"
    finally:
        # Its registration would otherwise outlive it; the other sites stay for later tests.
        stop(victim.proc, signal.SIGKILL)
        del deployment.sites[victim.name]
        subprocess.run(
            ["flwr", "supernode", "unregister", str(victim.node_id), CONNECTION],
            cwd=deployment.base,
            env=deployment.env,
            capture_output=True,
            timeout=60,
        )


def rounds_reached(log: Path) -> int:
    """The last tuning round ``flwr run --stream`` has started, by Flower's own round lines."""
    found = re.findall(r"\[ROUND (\d+)/\d+\]", log.read_text(errors="replace"))
    return int(found[-1]) if found else 0


def wait_round(proc: subprocess.Popen, log: Path, round_: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while rounds_reached(log) < round_:
        assert proc.poll() is None, f"flwr run ended before round {round_}:\n" + tail(log)
        assert time.monotonic() < deadline, f"round {round_} not reached in {timeout}s:\n" + tail(log)
        time.sleep(0.5)


SOAK_ROUNDS = 32


def test_a_soak_with_sites_restarting_and_the_superlink_crashing_loses_no_round(deployment):
    """32 tuning rounds; site 2's SuperNode stopped and restarted every 6 rounds (its keep
    mask survives in its ``state-dir``); the SuperLink killed without warning at round 14,
    restarted on its database, and the same ``flwr run`` command rerun, which resumes the run
    folder. Every round is in ``metrics.json`` once, the trace is not redone, the kept counts
    are the first run's, and the only failures are the restarting site's missed rounds."""
    sites = [deployment.site(1), deployment.site(2)]
    for index, site in enumerate(sites, start=1):  # both with a state-dir, so a restart keeps the selection
        stop(site.proc)
        key = deployment.base / "keys" / site.name
        data = deployment.base / f"{site.name}.jsonl"
        site.proc, site.log = deployment.start_supernode(
            f"{site.name}-soak", key, data, f'state-dir="{deployment.base / f"state-{index}"}"'
        )
    deployment.wait_status({s.node_id for s in sites}, "online")
    runs = deployment.base / "runs-soak"
    config = (
        RUN_CONFIG.replace("local-steps=2", "local-steps=1").replace("nodes=2", "nodes=1")
        + f" num-server-rounds={SOAK_ROUNDS} evaluate-every=8 round-timeout=90.0 output-dir='{runs}'"
    )
    first_log = deployment.base / "soak-1.log"
    proc = deployment.run_app(config, first_log)
    restarted = 0
    for round_ in (4, 10):  # site 2 stopped (gracefully: offline at once) and back a round later
        wait_round(proc, first_log, round_)
        victim = sites[1]
        stop(victim.proc)
        restarted += 1
        wait_round(proc, first_log, round_ + 1)
        victim.proc, victim.log = deployment.start_supernode(
            f"{victim.name}-soak-{restarted}",
            deployment.base / "keys" / victim.name,
            deployment.base / f"{victim.name}.jsonl",
            f'state-dir="{deployment.base / "state-2"}"',
        )
        deployment.wait_status({victim.node_id}, "online")
    wait_round(proc, first_log, 14)
    stop(deployment.superlink, signal.SIGKILL)  # the SuperLink and its ServerApp, without warning
    proc.wait(timeout=120)
    first = first_log.read_text(errors="replace")
    kept_first = dict(re.findall(r"\[clues\]   (node \d+): scored \d+ records in [\d.]+ s, kept (\d+)", first))
    assert len(kept_first) == 2, first[-3000:]
    partial = list(runs.glob("*.partial"))
    assert len(partial) == 1, f"one resumable run folder, found {partial}"

    deployment.start_superlink("superlink-restarted")
    deployment.wait_status({s.node_id for s in sites}, "online", timeout=180)
    second_log = deployment.base / "soak-2.log"
    out, run_dir = finished_run(deployment.run_app(config, second_log), second_log, timeout=900)
    assert "resum" in out and "trace: " not in out, "resumed from the run folder, the trace not redone"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == list(range(SOAK_ROUNDS + 1)), "every round once"
    assert all("train-loss" in r for r in metrics["rounds"][1:]), "every round aggregated"
    selection = json.loads((run_dir / "selection.json").read_text())
    assert {row["site"]: str(row["kept"]) for row in selection["clients"].values()} == kept_first
    reasons = [f["reason"] for f in metrics["failures"]]
    assert all(f["node"] == sites[1].node_id for f in metrics["failures"]), metrics["failures"]
    assert not any("selection" in r for r in reasons), "a restarted site kept its selection"
    assert len(list(runs.iterdir())) == 1, "the resumed folder is the run's only one"


GUIDE = ROOT / "docs" / "deployment.md"


def guide_blocks() -> dict[str, list[str]]:
    """The guide's code blocks (bash and TOML), by the heading of the section they are in."""
    sections = re.split(r"^## ", GUIDE.read_text(), flags=re.MULTILINE)[1:]
    return {
        section.splitlines()[0]: re.findall(r"^```(?:bash|toml)\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)
        for section in sections
    }


def on_loopback(text: str, swaps: dict[str, str]) -> str:
    """A guide command with its example names and paths swapped for this machine's; each
    must be in the command, so a changed guide fails here rather than running something else."""
    for example, here in swaps.items():
        assert example in text, f"docs/deployment.md no longer has {example!r} in:\n{text}"
        text = text.replace(example, here)
    return text


def test_the_deployment_guide_runs_as_written(tmp_path):
    """docs/deployment.md §1-§7, command by command: its openssl, SuperLink, ssh-keygen,
    `flwr config list`, `register`, trial-data, SuperNode, `flwr run` (the own-data form) and
    stop commands, run by bash with only the example host, ports and paths swapped for
    127.0.0.1 and this test's folder. Both sites go by their `site-label` in every line."""
    blocks = guide_blocks()
    step = lambda title, i=0: blocks[title][i]  # noqa: E731
    port, base = free_port(), tmp_path
    env = {**os.environ, "FLWR_HOME": str(base / "flwr-home"), "PYTHONUNBUFFERED": "1"}
    assert_free = socket.socket()
    assert_free.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: a closed run's TIME_WAIT is fine
    try:
        assert_free.bind(("127.0.0.1", 9094))  # §6's first SuperNode takes Flower's default Runtime API port
    except OSError:
        pytest.fail("port 9094 is in use here, and the guide's first SuperNode command needs it")
    finally:
        assert_free.close()

    def bash(command: str, cwd: Path = base, timeout: float = 120) -> str:
        return run_checked(["bash", "-euo", "pipefail", "-c", command], cwd, env, timeout)

    try:
        bash(step("1. Certificates (on the SuperLink machine)"))
        bash(on_loopback(step("2. Start the SuperLink"), {"--host 0.0.0.0 --port 8000": f"--port {port}"}))
        wait_healthy(port, base / "certificates" / "ca.crt", base / "superlink.log")
        keygen = step("3. A key pair per site (at the site)")
        bash(keygen)
        bash(on_loopback(keygen, {"site1": "site2"}))
        bash("flwr config list")  # §4: creates $FLWR_HOME/config.toml
        config = base / "flwr-home" / "config.toml"
        assert config.is_file(), "`flwr config list` did not create config.toml"
        connection = on_loopback(
            step("4. The operator's connection"),
            {
                "superlink.example.org:8000": f"127.0.0.1:{port}",
                "/absolute/path/to/certificates": str(base / "certificates"),
            },
        )
        config.write_text(config.read_text() + "\n" + connection)
        register = step("5. Register the sites' keys")
        bash(register)
        bash(on_loopback(register, {"site1": "site2"}))

        supernode, second, trial = blocks["6. One SuperNode per site"]
        bash(trial, timeout=300)
        shutil.copy(base / "certificates" / "ca.crt", base / "ca.crt")  # "Send ca.crt to every site"
        at = {"superlink.example.org:8000": f"127.0.0.1:{port}"}
        bash(on_loopback(supernode, {**at, "/site/data.jsonl": str(base / "site1.jsonl")}))
        bash(on_loopback(second, {**at, "/site2/data.jsonl": str(base / "site2.jsonl"), "9095": str(free_port())}))
        deadline = time.monotonic() + 90
        while True:
            out = bash("flwr supernode list clues --format json")
            nodes = json.loads(out[out.index("{") :])["nodes"]
            if sum(n["status"] == "online" for n in nodes) == 2:
                break
            assert time.monotonic() < deadline, f"the two SuperNodes are not online: {nodes}\n" + tail(
                base / "supernode.log"
            )
            time.sleep(1)

        runs = base / "runs"
        own_data = on_loopback(
            step("7. Run", 1),
            {
                "/srv/clues/runs": str(runs),
                "/srv/models/my-model": str(demo_model_path()),
                "/srv/clues/public": str(base),  # the trial block's validation, anchors and test files
            },
        )
        quick = ' --run-config "trace-rounds=1 local-steps=2 num-server-rounds=1"'  # the guide's run, shorter
        out = bash(own_data.rstrip() + quick, cwd=ROOT, timeout=900)
        found = re.search(r"\[clues\] run folder: (\S+)", out)
        assert found, out[-4000:]
        run_dir = Path(found.group(1))
        assert run_dir.parent == runs, out[-3000:]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert [r["round"] for r in metrics["rounds"]] == [0, 1] and metrics["failures"] == [], metrics
        selection = json.loads((run_dir / "selection.json").read_text())
        assert sorted(row["site"] for row in selection["clients"].values()) == ["site1", "site2"]
        assert "[clues]   site1: scored " in out and "[clues]   site2: scored " in out, out[-3000:]
        assert "[clues] site1: kept " in (base / "supernode.log").read_text(), tail(base / "supernode.log")
        assert "[clues] site2: kept " in (base / "supernode2.log").read_text(), tail(base / "supernode2.log")
        listed = bash("flwr ls clues --format json")  # §7: each run's final status
        assert "finished:completed" in listed, listed
    finally:  # the guide's stop commands, then whatever they left behind
        family = []
        for pid_file in base.glob("*.pid"):
            try:
                root = psutil.Process(int(pid_file.read_text()))
                family += [root, *root.children(recursive=True)]
            except (psutil.NoSuchProcess, ValueError):
                pass
        for name in ("supernode", "supernode2", "superlink"):
            subprocess.run(["bash", "-c", f'kill "$(cat {name}.pid)"'], cwd=base, env=env, capture_output=True)
        _, alive = psutil.wait_procs(family, timeout=20)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    assert 'kill "$(cat superlink.pid)"' in GUIDE.read_text() and 'kill "$(cat supernode.pid)"' in GUIDE.read_text()
