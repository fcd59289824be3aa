"""Log in with an ops account; the token is kept in this browser session only."""

from __future__ import annotations

import streamlit as st

from core.client import FleetAPIError, FleetClient
from dashboard.common import core_url, pop_flash, remember_login


def render() -> None:
    """The login form."""
    # The app is laid out wide for its tables; a login form that wide looks broken, so centre it.
    _, middle, _ = st.columns([1, 2, 1])
    with middle:
        form()


def form() -> None:
    """The form and what happens when it is sent."""
    st.title("fleetpush")
    st.caption(f"Core: {core_url()}")
    flash = pop_flash()
    if flash:
        st.info(flash)
    with st.form("login"):
        username = st.text_input("Username", key="login_username")
        password = st.text_input("Password", type="password", key="login_password")
        submitted = st.form_submit_button("Log in", type="primary")
    if not submitted:
        return
    if not username or not password:
        st.error("Enter a username and a password.")
        return
    try:
        with FleetClient(core_url()) as anonymous:
            info = anonymous.login(username, password)
    except FleetAPIError as exc:
        if exc.status == 401:
            st.error("Login failed: wrong username or password.")
        elif exc.status == 429:
            st.error(f"Too many failed logins: {exc.msg}. Wait a minute and try again.")
        else:
            st.error(f"Login failed: {exc.msg}")
        return
    remember_login(info)
    st.rerun()


render()
