//! The profiles shipped in the binary: `deny-all` (the default: no rules,
//! so everything is blocked) and `dev` (package registries for pip, npm and
//! cargo, GitHub read-only). Their text is in `profiles/*.toml`.

/// Every built-in profile: name and TOML text.
pub const BUILTIN_PROFILES: &[(&str, &str)] =
    &[("deny-all", include_str!("../profiles/deny-all.toml")), ("dev", include_str!("../profiles/dev.toml"))];

/// The text of a built-in profile.
pub fn builtin_profile(name: &str) -> Option<&'static str> {
    BUILTIN_PROFILES.iter().find(|(known, _)| *known == name).map(|(_, text)| *text)
}
