"""Entry point of the ops dashboard: ``streamlit run dashboard/app.py`` (see dashboard/launch.py).

The core's URL comes from ``FLEETPUSH_CORE_URL`` (or ``-- --core-url URL`` after the script path).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run dashboard/app.py` puts dashboard/ on sys.path, not the repository root; the pages
# import `dashboard.common` and `core.client`, so make the root importable when it is not installed.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from dashboard.common import current_user, logout  # noqa: E402

# Not "pages/": Streamlit treats a pages/ folder beside the entry script as a legacy multipage app
# and may run a page without this script (AppTest does so on every rerun), bypassing the login gate.
PAGES = Path(__file__).resolve().parent / "views"


def run() -> None:
    """Build the navigation for the logged-in user's role and run the chosen page."""
    # An emoji, not a ":material/...:" icon: Streamlit fetches a material favicon from fonts.gstatic.com,
    # and the dashboard must never call out to the internet (the browser test checks every request).
    st.set_page_config(page_title="fleetpush", page_icon="🤖", layout="wide")
    user = current_user()
    if user is None:
        page = st.navigation([st.Page(PAGES / "login.py", title="Log in", icon=":material/login:", default=True)])
        page.run()
        return

    sections: dict[str, list[st.Page]] = {
        "Fleet": [
            st.Page(PAGES / "fleet.py", title="Fleet", icon=":material/grid_view:", default=True),
            st.Page(PAGES / "device.py", title="Device", icon=":material/smart_toy:"),
        ],
    }
    if user.can_operate:
        sections["Control"] = [
            st.Page(PAGES / "commands.py", title="Commands", icon=":material/terminal:"),
            st.Page(PAGES / "broadcast.py", title="Broadcast", icon=":material/campaign:"),
        ]
    sections["Operations"] = [
        st.Page(PAGES / "health.py", title="Connections & health", icon=":material/monitor_heart:"),
    ]
    page = st.navigation(sections)

    with st.sidebar:
        st.caption(f"Signed in as **{user.username}** ({user.role})")
        if st.button("Log out", key="logout", icon=":material/logout:"):
            logout("You have logged out.")
            st.rerun()
    page.run()


if __name__ == "__main__":
    run()
