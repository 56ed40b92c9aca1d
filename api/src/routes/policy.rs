//! The policy engine over HTTP: `POST /v1/policy/check` loads profiles and
//! reports what they hold or where they are wrong; `POST
//! /v1/policy/explain` decides on one event and says which rule decided
//! and why (what `sandbox policy check | explain` print); `GET
//! /v1/sandboxes/{id}/profile` gives the profiles a sandbox was started
//! with.
//!
//! Profiles come as TOML text or built-in names, never as files: the
//! server runs as root. `${secret:NAME}` placeholders are not filled from
//! the server's environment (none is set here), so a profile that uses one
//! is reported as naming an unset secret.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::Json;
use sandbox::policy::{Engine, Event, Layer, ProfileError, ProfileSource, Secrets};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{blocking, find, JsonBody, SandboxId};
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// The largest request body of the policy endpoints: 2 MiB (a profile may
/// be up to 1 MiB).
pub const MAX_BODY: usize = 2 * 1024 * 1024;
/// The most profiles one request may layer.
pub const MAX_PROFILES: usize = 16;
/// The largest event, as JSON.
pub const MAX_EVENT: usize = 64 * 1024;

/// A profile: a built-in profile's name (`"deny-all"`, `"dev"`), or TOML text.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ProfileInput {
    /// A built-in profile's name.
    #[schema(example = "dev")]
    Builtin(String),
    /// Profile text.
    Text(ProfileText),
}

/// A profile's TOML text.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileText {
    /// What errors call it (default `profile-<n>.toml`, n counted from 1).
    pub name: Option<String>,
    /// The TOML text.
    #[schema(
        example = "[security.rules.dns.allow_pypi]\non = \"dns.request\"\nif = 'dns.request.qname == \"pypi.org\"'\ndecision = \"allow\"\n"
    )]
    pub text: String,
}

/// Profiles to load, lowest layer first (all in the user layer, so a lock
/// in one binds those after it).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    pub profiles: Vec<ProfileInput>,
}

/// Profiles and one event to decide on.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExplainRequest {
    /// As for `/v1/policy/check`.
    pub profiles: Vec<ProfileInput>,
    /// The event, as `sandbox policy explain --event` takes it.
    #[schema(value_type = Object, example = json!({"event": "http.request", "host": "pypi.org", "method": "GET"}))]
    pub event: serde_json::Value,
}

/// One problem in a profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProfileProblem {
    /// The profile (`builtin:<name>` for built-in ones), when the problem is in one.
    pub file: Option<String>,
    /// Line, from 1.
    pub line: Option<usize>,
    /// Column in characters, from 1.
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
}

/// A rule as the engine holds it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RuleSummary {
    /// `<section>.<name>`.
    #[schema(example = "dns.allow_pypi")]
    pub name: String,
    /// `dns.request`, `http.request`, `http.response` or `tcp.connect`.
    pub event: String,
    /// `allow`, `block`, `ask` or `rewrite`.
    pub decision: String,
    pub priority: u32,
    /// `built-in`, `corporate`, `user`.
    pub layer: String,
    /// `<profile>:<line>:<column>`.
    pub location: String,
    /// Its condition as written (none: always).
    pub condition: Option<String>,
}

/// What `/v1/policy/check` found.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CheckResponse {
    /// The profiles load.
    pub ok: bool,
    /// How many rules they hold (0 when not ok).
    pub rule_count: usize,
    /// The rules, in precedence order per event.
    pub rules: Vec<RuleSummary>,
    /// Every problem (empty when ok).
    pub errors: Vec<ProfileProblem>,
    /// What `sandbox policy check` prints.
    pub text: String,
}

/// What one rule made of the event.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RuleOutcome {
    #[serde(flatten)]
    pub rule: RuleSummary,
    /// `matched`, `not_matched`, `failed` (the condition could not be
    /// evaluated: a match for block rules), `other_event` (not evaluated),
    /// `gate_not_named` (the event needs a rule that names a field, such
    /// as the port, and this one does not).
    pub outcome: String,
    /// The evaluation error, or the field a gate needs.
    pub detail: Option<String>,
}

/// Why an event gets its verdict.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExplainResponse {
    /// `allow`, `block` or `ask`.
    #[schema(example = "block")]
    pub decision: String,
    /// The deciding rule (none: nothing matched, which blocks).
    pub rule: Option<String>,
    /// The rewrite actions that apply (secret values show as `[REDACTED]`).
    pub actions: Vec<String>,
    /// For an allowed `tcp.connect`: how the connection is carried.
    pub mode: Option<String>,
    /// Every rule: the event's deciding rules in precedence order, its
    /// rewrite rules, then the rules for other events.
    pub rules: Vec<RuleOutcome>,
    /// What `sandbox policy explain` prints.
    pub text: String,
}

/// One profile a sandbox was started with.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxProfile {
    /// `built-in`, `corporate`, `user` or `command line`.
    pub layer: String,
    /// `builtin`, `file` or `text`.
    pub source: String,
    /// The built-in profile's name, the file's path, or the text's name.
    pub name: String,
    /// The TOML text: of a built-in profile, or given as text. A file's
    /// text is not recorded (the file may have changed since).
    pub text: Option<String>,
}

/// The profiles a sandbox was started with, lowest layer first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxProfiles {
    /// Empty: the default, `deny-all` (or a policy an embedding program built).
    pub profiles: Vec<SandboxProfile>,
}

/// The profiles of a request, checked, as the engine loads them.
fn sources(profiles: &[ProfileInput]) -> ApiResult<Vec<(Layer, ProfileSource)>> {
    if profiles.is_empty() {
        return Err(ApiError::bad_request("profiles is empty"));
    }
    if profiles.len() > MAX_PROFILES {
        return Err(ApiError::bad_request(format!("more than {MAX_PROFILES} profiles")));
    }
    profiles
        .iter()
        .enumerate()
        .map(|(i, profile)| {
            let source = match profile {
                ProfileInput::Builtin(name) => {
                    if sandbox::policy::builtin_profile(name).is_none() {
                        return Err(ApiError::bad_request(format!(
                            "{name:?} is not a built-in profile (built-in: {}); give profile text as {{\"text\": \"...\"}}",
                            builtin_names()
                        )));
                    }
                    ProfileSource::Builtin(name.clone())
                }
                ProfileInput::Text(ProfileText { name, text }) => {
                    let name = name.clone().unwrap_or_else(|| format!("profile-{}.toml", i + 1));
                    super::check_text("a profile's name", &name, 256)?;
                    ProfileSource::Text { name, text: text.clone() }
                }
            };
            Ok((Layer::User, source))
        })
        .collect()
}

fn builtin_names() -> String {
    sandbox::policy::BUILTIN_PROFILES.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", ")
}

/// Load profiles with no secrets (the server's environment is nobody's business).
fn load(sources: &[(Layer, ProfileSource)]) -> Result<Engine, ProfileError> {
    sources
        .iter()
        .fold(Engine::builder().secrets(Secrets::none()), |builder, (layer, source)| {
            builder.profile(*layer, source.clone())
        })
        .build()
}

fn problems(error: &ProfileError) -> Vec<ProfileProblem> {
    error
        .problems()
        .into_iter()
        .map(|problem| match problem {
            ProfileError::Invalid { file, line, column, message } => ProfileProblem {
                file: Some(file.display().to_string()),
                line: Some(*line),
                column: Some(*column),
                message: message.clone(),
            },
            other => ProfileProblem { file: None, line: None, column: None, message: other.to_string() },
        })
        .collect()
}

fn rule_summary(rule: &sandbox::policy::RuleInfo) -> RuleSummary {
    RuleSummary {
        name: rule.name.clone(),
        event: rule.event.to_string(),
        decision: rule.decision.to_string(),
        priority: rule.priority,
        layer: rule.layer.to_string(),
        location: rule.location.to_string(),
        condition: rule.condition.clone(),
    }
}

/// What `profiles` hold, or every problem in them.
pub fn check_profiles(profiles: &[ProfileInput]) -> ApiResult<CheckResponse> {
    let sources = sources(profiles)?;
    Ok(match load(&sources) {
        Ok(engine) => {
            let summary = engine.summary();
            CheckResponse {
                ok: true,
                rule_count: summary.rules.len(),
                rules: summary.rules.iter().map(rule_summary).collect(),
                errors: Vec::new(),
                text: summary.to_string(),
            }
        }
        Err(e) => {
            CheckResponse { ok: false, rule_count: 0, rules: Vec::new(), errors: problems(&e), text: e.to_string() }
        }
    })
}

/// The profiles of a check request: JSON (`{"profiles": [...]}`) with
/// `Content-Type: application/json`, else the body is one profile's TOML text.
#[derive(Debug)]
pub struct CheckBody(pub Vec<ProfileInput>);

impl<S: Send + Sync> FromRequest<S> for CheckBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("application/json"));
        if json {
            let JsonBody(CheckRequest { profiles }) = JsonBody::<CheckRequest>::from_request(req, state).await?;
            return Ok(CheckBody(profiles));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| ApiError::rejected(e.status(), e.body_text()))?;
        let text = String::from_utf8(bytes.to_vec())
            .map_err(|e| ApiError::bad_request(format!("the profile is not UTF-8 text: {e}")))?;
        Ok(CheckBody(vec![ProfileInput::Text(ProfileText { name: None, text })]))
    }
}

/// Load profiles and say what they hold, or where they are wrong.
#[utoipa::path(post, path = "/v1/policy/check", tag = "policy",
    request_body(content((CheckRequest = "application/json"), (String = "application/toml")),
        description = "Profiles as JSON, or (any other content type) one profile's TOML text"),
    responses((status = 200, description = "The result of the check: `ok`, or the problems with their places", body = CheckResponse),
              (status = 400, description = "A request that is not profiles (bad JSON, an unknown built-in name, no profiles)", body = crate::ErrorBody),
              (status = 413, description = "A body over 2 MiB", body = crate::ErrorBody)))]
pub async fn check(CheckBody(profiles): CheckBody) -> ApiResult<Json<CheckResponse>> {
    blocking(move || check_profiles(&profiles)).await.map(Json)
}

/// The explanation of `event` under `profiles`.
pub fn explain_event(profiles: &[ProfileInput], event: &serde_json::Value) -> ApiResult<ExplainResponse> {
    let sources = sources(profiles)?;
    let event = serde_json::to_string(event).map_err(|e| ApiError::bad_request(format!("event: {e}")))?;
    if event.len() > MAX_EVENT {
        return Err(ApiError::bad_request(format!("the event is larger than {MAX_EVENT} bytes")));
    }
    let event = Event::from_json(&event).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let engine = load(&sources).map_err(|e| ApiError::bad_request(format!("the profiles do not load:\n{e}")))?;
    let explanation = engine.explain(&event);
    let rules = explanation
        .rules
        .iter()
        .map(|trace| {
            use sandbox::policy::Outcome;
            let (outcome, detail) = match &trace.outcome {
                Outcome::Matched => ("matched", None),
                Outcome::NotMatched => ("not_matched", None),
                Outcome::Failed { error, .. } => ("failed", Some(error.clone())),
                Outcome::OtherEvent(kind) => ("other_event", Some(kind.to_string())),
                Outcome::GateNotNamed(field) => ("gate_not_named", Some(field.path().to_string())),
            };
            RuleOutcome { rule: rule_summary(&trace.rule), outcome: outcome.into(), detail }
        })
        .collect();
    let verdict = &explanation.verdict;
    Ok(ExplainResponse {
        decision: verdict.decision.to_string(),
        rule: verdict.rule.clone(),
        actions: verdict.actions.iter().map(ToString::to_string).collect(),
        mode: verdict.mode.map(|m| m.to_string()),
        rules,
        text: explanation.to_string(),
    })
}

/// Decide on one event under the given profiles, and say which rule decided and why.
#[utoipa::path(post, path = "/v1/policy/explain", tag = "policy", request_body = ExplainRequest,
    responses((status = 200, description = "The verdict and every rule's part in it", body = ExplainResponse),
              (status = 400, description = "Profiles that do not load (with their places), or an event that is not one", body = crate::ErrorBody),
              (status = 413, description = "A body over 2 MiB", body = crate::ErrorBody)))]
pub async fn explain(JsonBody(request): JsonBody<ExplainRequest>) -> ApiResult<Json<ExplainResponse>> {
    blocking(move || explain_event(&request.profiles, &request.event)).await.map(Json)
}

/// The policy profiles a sandbox was started with.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/profile", tag = "policy",
    params(("id" = String, Path, description = "The sandbox's id")),
    responses((status = 200, description = "Its profiles, lowest layer first", body = SandboxProfiles),
              (status = 400, description = "An id that is not one", body = crate::ErrorBody),
              (status = 404, description = "No such sandbox", body = crate::ErrorBody)))]
pub async fn sandbox_profile(
    State(state): State<AppState>,
    SandboxId(id): SandboxId,
) -> ApiResult<Json<SandboxProfiles>> {
    let sandbox = blocking(move || find(&state, &id)).await?;
    let profiles = sandbox
        .state()
        .profiles
        .iter()
        .map(|(layer, source)| {
            let (kind, name, text) = match source {
                ProfileSource::Builtin(name) => {
                    ("builtin", name.clone(), sandbox::policy::builtin_profile(name).map(str::to_string))
                }
                ProfileSource::File(path) => ("file", path.display().to_string(), None),
                ProfileSource::Text { name, text } => ("text", name.clone(), Some(text.clone())),
            };
            SandboxProfile { layer: layer.to_string(), source: kind.into(), name, text }
        })
        .collect();
    Ok(Json(SandboxProfiles { profiles }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[security.rules.dns.allow_pypi]
on = "dns.request"
if = 'dns.request.qname == "pypi.org"'
decision = "allow"
"#;

    fn text(t: &str) -> ProfileInput {
        ProfileInput::Text(ProfileText { name: None, text: t.into() })
    }

    #[test]
    fn a_good_profile_checks_and_a_bad_one_says_where() {
        let ok = check_profiles(&[text(GOOD)]).unwrap();
        assert!(ok.ok && ok.rule_count == 1 && ok.errors.is_empty(), "{ok:?}");
        assert_eq!(ok.rules[0].name, "dns.allow_pypi");
        let bad =
            check_profiles(&[text("[security.rules.dns.x]\non = \"dns.request\"\ndecision = \"maybe\"\n")]).unwrap();
        assert!(!bad.ok, "{bad:?}");
        let problem = &bad.errors[0];
        assert_eq!(problem.file.as_deref(), Some("profile-1.toml"));
        assert!(problem.line.is_some_and(|l| l >= 1) && problem.column.is_some(), "{problem:?}");
        assert!(check_profiles(&[]).is_err());
        assert!(check_profiles(&[ProfileInput::Builtin("/etc/shadow".into())]).is_err());
    }

    #[test]
    fn secrets_are_not_taken_from_the_servers_environment() {
        std::env::set_var("API_TEST_SECRET", "hunter2");
        let profile = r#"
[security.rules.http.token]
on = "http.request"
decision = "rewrite"
set_request_headers = { authorization = "Bearer ${secret:API_TEST_SECRET}" }
"#;
        let result = check_profiles(&[text(profile)]).unwrap();
        assert!(!result.ok, "{result:?}");
        assert!(!result.text.contains("hunter2"));
    }
}
