"""Optional sign-in with Streamlit's built-in OpenID Connect login (``st.login`` / ``st.user``).

Off unless ``.streamlit/secrets.toml`` has an ``[auth]`` section (``redirect_uri``,
``cookie_secret``, ``client_id``, ``client_secret``, ``server_metadata_url``; see
docs/hosting.md). When it is on, a visitor who is not signed in sees only the sign-in page, and
``VITLENS_ALLOWED_EMAIL_DOMAINS`` (comma-separated, e.g. ``example.org``) refuses accounts of
other domains. Uploads then belong to the signed-in user instead of the browser session.
"""
from __future__ import annotations

import streamlit as st
from streamlit.auth_util import get_secrets_auth_section

from resources import settings


def enabled() -> bool:
    """Whether sign-in is configured (an ``[auth]`` section in the secrets)."""
    return bool(get_secrets_auth_section())


def signed_in() -> bool:
    return enabled() and bool(st.user.get("is_logged_in"))


def email() -> str:
    """The signed-in user's e-mail (the subject when the provider gives none)."""
    return str(st.user.get("email") or st.user.get("sub") or "")


def domain_allowed(address: str, domains: tuple[str, ...] | None) -> bool:
    """True when ``domains`` is None or the address's domain is one of them (or a subdomain)."""
    if domains is None:
        return True
    _, at, host = address.rpartition("@")
    host = host.lower()
    return bool(at) and any(host == domain or host.endswith("." + domain) for domain in domains)


def gate() -> None:
    """Stop the script with the sign-in page (signed out) or a refusal (a domain not allowed)."""
    if not enabled():
        return
    if not st.user.get("is_logged_in"):
        _sign_in_page()
        st.stop()
    if not domain_allowed(email(), settings().allowed_email_domains):
        st.title("vitlens")
        st.error(f"The account {email()[:80]} is not allowed here: this demo is for "
                 f"{', '.join(settings().allowed_email_domains)} accounts.")
        st.button("Sign out", on_click=st.logout)
        st.stop()


def _sign_in_page() -> None:
    st.title("vitlens")
    st.write("This dashboard is for a team: sign in to look at high-norm artifact tokens in Vision Transformers.")
    st.button("Sign in", type="primary", on_click=st.login)


def account_panel() -> None:
    """The signed-in user and a sign-out button (sidebar); nothing when sign-in is off."""
    if signed_in():
        st.caption(f"Signed in as {email()[:80]}")
        st.button("Sign out", on_click=st.logout, key="sign-out")
