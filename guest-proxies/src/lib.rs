//! Guest-side proxies.
