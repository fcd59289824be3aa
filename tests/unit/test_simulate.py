"""The fleet simulator without sockets: state model, token, backoff, command de-duplication and acks."""

from __future__ import annotations

import argparse
import json
import random
from typing import Any

import pytest

from core.simulate import (
    DEVICE_TYPES,
    Fleet,
    RobotModel,
    SimClock,
    SimConfig,
    SimDevice,
    add_arguments,
    backoff_delay,
    config_from_args,
    login_token,
    make_sn,
    replaced_delay,
)

URL = "ws://127.0.0.1:1/ws"


class FixedClock:
    """A wall clock that only moves when told to."""

    def __init__(self, now: float = 1_795_000_000.0) -> None:
        self.now = now

    def time(self) -> float:
        """Unix seconds."""
        return self.now


async def _no_sleep(_: float) -> None:
    """A sleep that never waits (unit tests never touch the loop's clock)."""


def device(device_type: str = "dance_dog", seed: int = 1, **kw: Any) -> SimDevice:
    """A SimDevice that never connects."""
    clock = FixedClock()
    sim_clock = SimClock(time_fn=clock.time, sleep_fn=_no_sleep)
    cfg = SimConfig(url=URL, secret="s3cret", seed=seed, clock=sim_clock, **kw)
    return SimDevice(cfg, 0, device_type)


def check_contract(report: dict[str, Any]) -> None:
    """A report keeps PROTOCOL §3's types and limits."""
    assert isinstance(report["battery"], int | float) and 0 <= report["battery"] <= 100
    for name in ("location", "inspection", "rubbish", "electricity"):
        code, msg = report[f"{name}_code"], report[f"{name}_msg"]
        assert isinstance(code, int) and not isinstance(code, bool)
        assert isinstance(msg, str) and len(msg) <= 256
        assert (code == 0) or msg, f"a non-zero {name}_code needs a message"
    assert isinstance(report["extra"], dict)
    assert len(json.dumps(report["extra"]).encode()) <= 4096
    assert {"x", "y", "mode"} <= set(report["extra"])


# ---- token ----

def test_login_token_matches_a_known_hmac() -> None:
    """The token is lowercase hex HMAC-SHA256(secret, "sn:timestamp") (vector checked with openssl)."""
    expected = "93c24f7ba905419c76007e132643debbe41aa6f8871b44fce16a6e5f928781c4"
    assert login_token("s3cret", "DOG-0001", 1795000000) == expected


def test_login_values_carry_a_valid_token_and_never_reuse_a_timestamp() -> None:
    """Two logins in the same second still get distinct timestamps (a replay would be refused)."""
    d = device()
    first, second = d.login_values(), d.login_values()
    assert first["timestamp"] == 1795000000 and second["timestamp"] == 1795000001
    for v in (first, second):
        assert v["token"] == login_token("s3cret", d.sn, v["timestamp"])
        assert v["sn"] == d.sn and v["type"] == "dance_dog" and isinstance(v["firmware"], str)


def test_per_device_secret_overrides_the_fleet_secret() -> None:
    """A device listed in ``secrets`` signs with its own secret."""
    sn = make_sn("SIM", "retail", 0)
    cfg = SimConfig(url=URL, secret="fleet", secrets={sn: "mine"})
    d = SimDevice(cfg, 0, "retail")
    v = d.login_values()
    assert v["token"] == login_token("mine", sn, v["timestamp"])
    assert SimDevice(cfg, 1, "retail").config.secret_for("SIM-RTL-0002") == "fleet"


def test_secret_is_not_in_the_config_repr() -> None:
    """Printing a config never shows a secret."""
    cfg = SimConfig(url=URL, secret="hunter2", secrets={"A": "other-secret"})
    assert "hunter2" not in repr(cfg) and "other-secret" not in repr(cfg)


# ---- backoff ----

@pytest.mark.parametrize("attempt", [0, 1, 2, 5, 10, 100, 10_000])
def test_backoff_is_full_jitter_within_the_cap(attempt: int) -> None:
    """Each delay lies in [0, min(cap, base * 2**attempt)]."""
    rng = random.Random(attempt)
    ceiling = min(30.0, 0.5 * 2.0 ** min(attempt, 62))
    delays = [backoff_delay(attempt, rng, base_s=0.5, cap_s=30.0) for _ in range(500)]
    assert all(0.0 <= d <= ceiling for d in delays)
    assert max(delays) > ceiling * 0.8  # jitter spreads over the whole range
    assert min(delays) < ceiling * 0.2


def test_replaced_backs_off_long_then_gives_up() -> None:
    """After 4409 the delay is in [cap/2, cap]; after max_replaced replacements the device stops."""
    rng = random.Random(3)
    assert all(15.0 <= replaced_delay(rng, cap_s=30.0) <= 30.0 for _ in range(500))
    d = device(max_backoff_s=10.0, max_replaced=3)
    delays = [d.next_delay(4409) for _ in range(3)]
    assert all(x is not None and 5.0 <= x <= 10.0 for x in delays[:2])
    assert delays[2] is None


def test_ordinary_drops_grow_the_backoff() -> None:
    """Successive failures raise the ceiling up to max_backoff_s."""
    d = device(max_backoff_s=4.0, base_backoff_s=0.5)
    for attempt in range(12):
        delay = d.next_delay(1006 if attempt % 2 else None)
        assert delay is not None and 0.0 <= delay <= min(4.0, 0.5 * 2**attempt)


# ---- the state model ----

@pytest.mark.parametrize("device_type", DEVICE_TYPES)
def test_battery_drains_while_working_then_charges_at_the_dock(device_type: str) -> None:
    """A working robot drains, goes home when low, charges to nearly full and goes back to work."""
    model = RobotModel(device_type, random.Random(5))
    model.battery, model.bin_level = 60.0, 0.0
    start = model.report()["battery"]
    modes: list[str] = []
    batteries: list[float] = []
    bin_full: list[bool] = []
    for _ in range(20_000):  # bounded: 20 000 simulated seconds
        r = model.step(1.0)
        check_contract(r)
        bin_full.append(r["rubbish_code"] != 0)
        modes.append(r["extra"]["mode"])
        batteries.append(r["battery"])
        if "charging" in modes and r["extra"]["mode"] == model.work_mode:
            break
    assert min(batteries[:50]) < start  # drains from the first steps on
    assert "returning" in modes or modes.index("charging") > 0
    charging_at = modes.index("charging")
    # It went home because the battery was low (or, for a rubbish robot, perhaps because its bin was full).
    assert batteries[charging_at] < 25.0 or (device_type == "rubbish" and any(bin_full[: charging_at + 1]))
    assert model.at_dock or modes[-1] == model.work_mode
    assert batteries[-1] >= 95.0 and modes[-1] == model.work_mode


def test_drain_rate_depends_on_type() -> None:
    """A dancing dog drains faster than a retail robot."""
    dog, shop = RobotModel("dance_dog", random.Random(1)), RobotModel("retail", random.Random(1))
    dog.battery = shop.battery = 90.0
    for _ in range(100):
        dog.step(1.0)
        shop.step(1.0)
    assert 90.0 - dog.battery > 90.0 - shop.battery > 0


def test_low_battery_sets_the_electricity_code() -> None:
    """Below 20 % the robot reports electricity_code 1, below 5 % code 2, each with a message."""
    model = RobotModel("retail", random.Random(2))
    model.battery = 15.0
    r = model.report()
    assert r["electricity_code"] == 1 and "battery low" in r["electricity_msg"]
    model.battery = 3.0
    r = model.report()
    assert r["electricity_code"] == 2 and "critical" in r["electricity_msg"]
    model.battery = 80.0
    assert model.report()["electricity_code"] == 0


def _run_until(model: RobotModel, key: str, want_nonzero: bool, limit: int = 50_000) -> dict[str, Any]:
    """Step one simulated second at a time until ``key`` is (non-)zero; bounded by ``limit`` steps."""
    for _ in range(limit):
        r = model.step(1.0)
        check_contract(r)
        if bool(r[key]) == want_nonzero:
            return r
    raise AssertionError(f"{key} never became {'non-zero' if want_nonzero else 'zero'}")


@pytest.mark.parametrize(("key", "words"), [("location_code", "localization lost"),
                                            ("inspection_code", "route blocked")])
def test_faults_appear_and_clear(key: str, words: str) -> None:
    """Location loss and blocked routes happen now and then, with a message, and clear after a while."""
    model = RobotModel("retail", random.Random(11))
    r = _run_until(model, key, True)
    assert words in r[key.replace("_code", "_msg")]
    cleared = _run_until(model, key, False, limit=120)
    assert cleared[key.replace("_code", "_msg")] == ""


def test_rubbish_bin_fills_up_and_is_emptied_at_the_dock() -> None:
    """A rubbish robot's bin fills, it reports rubbish_code 1 and heads home, where the bin is emptied."""
    model = RobotModel("rubbish", random.Random(4))
    model.battery, model.bin_level = 100.0, 90.0
    r = _run_until(model, "rubbish_code", True, limit=200)
    assert r["rubbish_msg"] == "rubbish bin full" and r["extra"]["mode"] in ("returning", "charging")
    r = _run_until(model, "rubbish_code", False, limit=1000)
    assert r["extra"]["bin_level"] < 5.0


def test_no_rubbish_faults_on_other_types() -> None:
    """Only rubbish robots have a bin."""
    model = RobotModel("dance_robot", random.Random(4))
    assert all(model.step(5.0)["rubbish_code"] == 0 for _ in range(2000))


@pytest.mark.parametrize("device_type", DEVICE_TYPES)
def test_reports_stay_within_the_contract_for_a_long_run(device_type: str) -> None:
    """A day of simulated time in uneven steps never breaks a field limit."""
    rng = random.Random(99)
    model = RobotModel(device_type, random.Random(7))
    for _ in range(20_000):
        check_contract(model.step(rng.uniform(0.0, 9.0)))


def test_the_model_is_deterministic_for_a_seed() -> None:
    """The same seed gives the same reports."""
    a, b = RobotModel("dance_dog", random.Random(42)), RobotModel("dance_dog", random.Random(42))
    assert [a.step(2.0) for _ in range(500)] == [b.step(2.0) for _ in range(500)]


def test_time_scale_speeds_up_the_model() -> None:
    """With time_scale 10, one wall second moves the model by ten."""
    fast, slow = device(seed=3, time_scale=10.0), device(seed=3)
    fast.model.battery = slow.model.battery = 90.0
    fast.step(1.0)
    slow.step(10.0)
    assert fast.model.t == slow.model.t == 10.0
    assert fast.model.battery == slow.model.battery


def test_commands_change_the_model() -> None:
    """dock, dance, stop, move and the rest act on the model; impossible ones fail with a reason."""
    dog = RobotModel("dance_dog", random.Random(1))
    dog.battery = 80.0
    assert dog.apply_command("dance", {"duration_s": 10}).ok and dog.mode == "dancing"
    for _ in range(11):
        dog.step(1.0)
    assert dog.mode == dog.work_mode
    assert dog.apply_command("stop", {}).ok and dog.mode == "stopped"
    before = (dog.x, dog.y)
    dog.step(10.0)
    assert (dog.x, dog.y) == before
    assert dog.apply_command("move", {"x": 1, "y": 2}).ok and dog.mode == "moving"
    for _ in range(200):
        dog.step(1.0)
        if dog.mode != "moving":
            break
    assert (round(dog.x, 3), round(dog.y, 3)) == (1.0, 2.0) and dog.mode == dog.work_mode
    assert dog.apply_command("dock", {}).ok and dog.mode == "returning"
    shop = RobotModel("retail", random.Random(1))
    refused = shop.apply_command("dance", {})
    assert not refused.ok and "cannot dance" in refused.msg
    bad = shop.apply_command("move", {"x": "left"})
    assert not bad.ok and "x and y" in bad.msg
    unknown = shop.apply_command("self_destruct", {})
    assert not unknown.ok and unknown.code != 0 and "unknown command" in unknown.msg


# ---- commands: de-duplication and ack decisions ----

def _cmd(cid: str, command: str = "dock") -> dict[str, Any]:
    return {"command_id": cid, "command": command, "args": {}, "issued_at": "t0", "expires_at": "t1"}


def test_a_command_is_executed_once_and_redeliveries_are_ignored() -> None:
    """First delivery acks; a duplicate on the same session or after the server confirmed is ignored."""
    d = device(ack_failure_rate=0.0, slow_ack_rate=0.0)
    d.session = 1
    action, ack, delay = d.on_command(_cmd("c-1"))
    assert (action, ack, delay) == ("ack", None, 0.0)
    values = d.execute(_cmd("c-1"))
    assert values["ok"] is True and values["command_id"] == "c-1"
    assert d.model.mode in ("returning", "charging")
    d.record_ack("c-1", values)
    assert d.on_command(_cmd("c-1"))[0] == "ignore"  # ack in flight on this connection
    d.ack_replied("c-1", 0)
    d.session = 2
    assert d.on_command(_cmd("c-1"))[0] == "ignore"  # confirmed: never again
    assert d.stats.commands_duplicate == 2 and d.stats.acks_confirmed == 1


def test_an_unconfirmed_ack_is_resent_on_redelivery_after_a_reconnect() -> None:
    """When the link dropped before the server confirmed, the remembered ack is sent again, not re-run."""
    d = device(ack_failure_rate=0.0, slow_ack_rate=0.0)
    d.session = 1
    d.on_command(_cmd("c-2"))
    values = d.execute(_cmd("c-2"))
    d.record_ack("c-2", values)
    d.session = 2
    assert d.on_command(_cmd("c-2")) == ("resend", values, 0.0)
    d.record_ack("c-2", values)
    d.ack_replied("c-2", 503)  # not taken: a later redelivery gets it again, even on this session
    assert d.on_command(_cmd("c-2"))[0] == "resend"
    d.ack_replied("c-2", 409)  # final already: done
    assert d.on_command(_cmd("c-2"))[0] == "ignore"


def test_cancel_drops_a_pending_slow_ack() -> None:
    """command_canceled for a command nobody is waiting on is remembered so a late delivery is ignored."""
    d = device()
    assert d.on_canceled("c-9") is False
    assert d.on_command(_cmd("c-9"))[0] == "ignore"


def test_a_push_without_command_id_is_counted_not_acked() -> None:
    """A malformed device_command is counted as a 400 and ignored."""
    d = device()
    assert d.on_command({"command": "dock"})[0] == "ignore"
    assert d.stats.errors[400] == 1


def test_ack_decisions_follow_the_configured_rates() -> None:
    """With a seeded RNG, the share of random failures and slow acks matches the configuration."""
    d = device(seed=123, ack_failure_rate=0.2, slow_ack_rate=0.3, slow_ack_s=3.0)
    plans = [d.plan_ack("dock") for _ in range(5000)]
    failed = [p for p in plans if p.fail is not None]
    slow = [p for p in plans if p.fail is None and p.delay_s == 3.0]
    assert 0.17 < len(failed) / 5000 < 0.23
    assert 0.27 < len(slow) / (5000 - len(failed)) < 0.33
    assert all(not p.fail.ok and p.fail.code != 0 and 0 < len(p.fail.msg) <= 256 for p in failed if p.fail)
    again = device(seed=123, ack_failure_rate=0.2, slow_ack_rate=0.3, slow_ack_s=3.0)
    assert [again.plan_ack("dock") for _ in range(5000)] == plans
    never = device(ack_failure_rate=0.0, slow_ack_rate=0.0)
    assert all(p.fail is None and p.delay_s == 0.0 for p in (never.plan_ack("x") for _ in range(500)))


def test_a_random_failure_is_acked_without_running_the_command() -> None:
    """A command that fails at random leaves the model untouched and is acked ok=false."""
    d = device(ack_failure_rate=1.0)
    mode = d.model.mode
    action, ack, _ = d.on_command(_cmd("c-3", "stop"))
    assert action == "ack" and ack is not None and ack["ok"] is False and ack["code"] != 0
    assert d.model.mode == mode


def test_unknown_command_is_acked_not_ok_with_a_message() -> None:
    """An unknown command gets ok=false and says why."""
    d = device(ack_failure_rate=0.0, slow_ack_rate=0.0)
    ack = d.execute(_cmd("c-4", "fly"))
    assert ack["ok"] is False and "unknown command" in ack["msg"] and ack["code"] != 0


# ---- fleet and CLI wiring ----

def test_fleet_assigns_types_round_robin_with_unique_serials() -> None:
    """Devices get every requested type in turn and distinct serial numbers."""
    fleet = Fleet(SimConfig(url=URL, devices=10, types=["retail", "rubbish"], secret="x"))
    assert [d.type for d in fleet.devices[:4]] == ["retail", "rubbish", "retail", "rubbish"]
    assert len({d.sn for d in fleet.devices}) == 10
    assert fleet.devices[1].sn == "SIM-RUB-0002"
    with pytest.raises(ValueError, match="unknown device types"):
        Fleet(SimConfig(url=URL, types=["toaster"]))


def test_cli_flags_and_the_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """add_arguments defines the documented flags; the secret falls back to the environment."""
    monkeypatch.setenv("FLEETPUSH_AUTH__DEVICE_SECRET", "from-env")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--url", "ws://127.0.0.1:9/ws", "--devices", "5", "--types", "retail",
                              "dance_dog", "--interval", "0.5", "--seed", "9", "--duration", "3", "--time-scale", "20"])
    cfg = config_from_args(args)
    assert (cfg.url, cfg.devices, cfg.types, cfg.interval_s, cfg.seed) == (
        "ws://127.0.0.1:9/ws", 5, ["retail", "dance_dog"], 0.5, 9)
    assert cfg.secret == "from-env" and args.duration == 3.0 and cfg.time_scale == 20.0
    assert config_from_args(parser.parse_args(["--secret", "flag"])).secret == "flag"
    assert "from-env" not in parser.format_help()
