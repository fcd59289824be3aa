"""First end-to-end check: a device and an admin talk to a live core."""

from __future__ import annotations

from conftest import Core


async def test_device_and_admin_login_status_push(core: Core) -> None:
    ops = await core.ops()
    sub = await ops.request("/admin/device/subscribe", {})
    assert sub["code"] == 0
    dev = await core.device("DOG-0001", "dance_dog")
    online = await ops.push("device_online")
    assert online["values"]["sn"] == "DOG-0001"
    reply = await dev.request("/api/device/status", {"battery": 81, "location_code": 0}, request_id=17)
    assert reply["code"] == 0 and reply["result"] is True and reply["request_id"] == 17
    assert reply["values"]["accepted"] is True
    pushed = await ops.push("device_status")
    assert pushed["values"]["battery"] == 81 and pushed["values"]["sn"] == "DOG-0001"
    listed = await ops.request("/admin/device/list", {})
    assert [d["sn"] for d in listed["values"]["devices"]] == ["DOG-0001"]
    assert listed["values"]["devices"][0]["status"]["battery"] == 81
    await dev.close()
    off = await ops.push("device_offline")
    assert off["values"]["reason"] == "closed"
