//! The engine: profiles loaded into layers, compiled once, deciding events.
//!
//! Loading reads each profile (a file, a built-in profile or text), checks
//! it, and then checks the profiles against each other: rule names are
//! unique across all profiles, and a section locked by one profile only
//! takes block rules from the profiles loaded after it. Profiles load in
//! layer order (built-in < corporate < user < command line), in the given
//! order within a layer.
//!
//! Deciding looks only at the rules for the event's kind, kept sorted by
//! precedence (priority, then block before ask before allow), so the first
//! rule that matches decides; rewrite rules are kept apart and only
//! consulted when the decision is allow. The engine is an `Arc`: cloning it
//! is cheap and it can be shared across threads.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cel::Env;

use crate::condition::{self, Condition, EvalCx};
use crate::event::{Event, EventKind, Field, Section, HTTPS_PORT};
use crate::explain::{Explanation, Outcome, RuleInfo, RuleTrace, Summary};
use crate::limits::{DnsLimits, GivenDnsLimits};
use crate::location::{Location, SourceText};
use crate::profile::{self, LockSpec};
use crate::secrets::Secrets;
use crate::{builtin, Action, ConnectMode, Decision, DnsRecord, ProfileError, Verdict};

/// What a rule says, as written in its `decision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleDecision {
    /// `allow`
    Allow,
    /// `block`
    Block,
    /// `ask`
    Ask,
    /// `rewrite`: contributes actions to allowed traffic, never decides.
    Rewrite,
}

impl RuleDecision {
    /// The name in profiles.
    pub fn name(self) -> &'static str {
        match self {
            RuleDecision::Allow => "allow",
            RuleDecision::Block => "block",
            RuleDecision::Ask => "ask",
            RuleDecision::Rewrite => "rewrite",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<RuleDecision> {
        [RuleDecision::Allow, RuleDecision::Block, RuleDecision::Ask, RuleDecision::Rewrite]
            .into_iter()
            .find(|decision| decision.name() == name)
    }

    /// The decision a deciding rule makes (`None` for rewrite rules).
    pub fn decision(self) -> Option<Decision> {
        match self {
            RuleDecision::Allow => Some(Decision::Allow),
            RuleDecision::Block => Some(Decision::Block),
            RuleDecision::Ask => Some(Decision::Ask),
            RuleDecision::Rewrite => None,
        }
    }

    /// Tie order at equal priority: block, then ask, then allow.
    fn tie_rank(self) -> u8 {
        match self {
            RuleDecision::Block => 0,
            RuleDecision::Ask => 1,
            RuleDecision::Allow | RuleDecision::Rewrite => 2,
        }
    }
}

impl fmt::Display for RuleDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The layer a profile is loaded into. Later layers are loaded after
/// earlier ones, so locks in earlier layers bind them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub enum Layer {
    /// The built-in default profile.
    Builtin,
    /// Profiles an organisation installs.
    Corporate,
    /// The user's own profiles.
    User,
    /// Rules made from command-line flags.
    Flags,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layer::Builtin => "built-in",
            Layer::Corporate => "corporate",
            Layer::User => "user",
            Layer::Flags => "command line",
        })
    }
}

/// Where a profile comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ProfileSource {
    /// A TOML file.
    File(PathBuf),
    /// A built-in profile by name (`deny-all`, `dev`); its place in errors is
    /// `builtin:<name>`.
    Builtin(String),
    /// Profile text, e.g. made from command-line flags; `name` stands for
    /// the file in errors.
    Text {
        /// The name used in locations.
        name: String,
        /// The TOML text.
        text: String,
    },
}

impl ProfileSource {
    /// A profile named on a command line: a built-in profile's name
    /// (`dev`), else a file path. Write `./dev` for a file named like a
    /// built-in profile.
    pub fn from_arg(arg: &str) -> ProfileSource {
        if builtin::builtin_profile(arg).is_some() {
            ProfileSource::Builtin(arg.to_owned())
        } else {
            ProfileSource::File(PathBuf::from(arg))
        }
    }

    fn read(&self) -> Result<SourceText, ProfileError> {
        match self {
            ProfileSource::File(path) => {
                let bytes = std::fs::read(path).map_err(|source| ProfileError::Io { file: path.clone(), source })?;
                profile::text_of(Arc::from(path.as_path()), bytes)
            }
            ProfileSource::Builtin(name) => {
                let text = builtin::builtin_profile(name)
                    .ok_or_else(|| ProfileError::UnknownBuiltin { name: name.clone() })?;
                Ok(SourceText { name: Arc::from(Path::new(&format!("builtin:{name}"))), text: text.to_owned() })
            }
            ProfileSource::Text { name, text } => {
                profile::text_of(Arc::from(Path::new(name)), text.clone().into_bytes())
            }
        }
    }
}

/// A compiled rule.
#[derive(Debug)]
pub(crate) struct Rule {
    pub name: String,
    pub section: Section,
    pub event: EventKind,
    pub decision: RuleDecision,
    pub priority: u32,
    pub condition: Condition,
    pub condition_text: Option<String>,
    pub actions: Vec<Action>,
    /// For `tcp.connect` allow and ask rules: how an allowed connection is carried.
    pub mode: Option<ConnectMode>,
    pub description: Option<String>,
    pub location: Location,
    pub layer: Layer,
    /// Position of the rule's profile in load order.
    pub order: usize,
}

impl Rule {
    /// Whether the rule applies to the event. A condition that fails to
    /// evaluate counts as a match for block rules (fail closed) and as no
    /// match for the others.
    fn matches(&self, event: &Event, cx: &EvalCx<'_, '_, '_>) -> bool {
        if self.unnamed_gate(event).is_some() {
            return false;
        }
        match self.condition.eval(cx) {
            Ok(matched) => matched,
            Err(_) => self.decision == RuleDecision::Block,
        }
    }

    /// The field this rule would have to read to allow (or ask about) the
    /// event, when it does not: a rule written for a host does not open every
    /// port of it, nor one for a name every record type.
    ///
    /// - an `http.request` to a port other than 443 needs `http.request.port`;
    /// - a `dns.request` of a type other than A, AAAA, CNAME, HTTPS, MX, SRV
    ///   and TXT needs `dns.request.qtype`;
    /// - a `tcp.connect` to a port other than 443 needs `tcp.connect.port`,
    ///   and one to an address the sandbox did not get from an allowed DNS
    ///   answer (empty `tcp.connect.host`) needs `tcp.connect.ip`.
    ///
    /// Block and rewrite rules apply everywhere (a rewrite only acts on what
    /// was allowed). Responses are not gated again: they only exist for
    /// requests a rule naming the port allowed.
    pub(crate) fn unnamed_gate(&self, event: &Event) -> Option<Field> {
        if !matches!(self.decision, RuleDecision::Allow | RuleDecision::Ask) {
            return None;
        }
        let gates: &[Field] = match event {
            Event::HttpRequest(request) if request.port != HTTPS_PORT => &[Field::HttpPort],
            Event::DnsRequest(query) if !COMMON_QTYPES.contains(&query.qtype.as_str()) => &[Field::DnsQtype],
            Event::TcpConnect(tcp) => match (tcp.port != HTTPS_PORT, tcp.host.is_empty()) {
                (true, true) => &[Field::TcpPort, Field::TcpIp],
                (true, false) => &[Field::TcpPort],
                (false, true) => &[Field::TcpIp],
                (false, false) => &[],
            },
            _ => &[],
        };
        gates.iter().copied().find(|&gate| !self.condition.reads(gate))
    }
}

/// The DNS record types a rule for a name allows without naming the type.
pub const COMMON_QTYPES: [&str; 7] = ["A", "AAAA", "CNAME", "HTTPS", "MX", "SRV", "TXT"];

/// A lock, with the profile that declared it.
#[derive(Debug, Clone)]
pub(crate) struct Lock {
    pub section: Section,
    pub location: Location,
    pub layer: Layer,
}

/// A loaded profile.
#[derive(Debug, Clone)]
pub(crate) struct LoadedProfile {
    pub name: Arc<Path>,
    pub layer: Layer,
    pub description: Option<String>,
}

pub(crate) struct Inner {
    env: Arc<Env>,
    pub rules: Vec<Rule>,
    /// Per event kind: indices of allow, block and ask rules in precedence order.
    deciding: [Vec<usize>; 4],
    /// Per event kind: indices of rewrite rules in priority order.
    rewriting: [Vec<usize>; 4],
    pub locks: Vec<Lock>,
    pub profiles: Vec<LoadedProfile>,
    /// The values of every secret the rules use, longest first.
    secret_values: Vec<String>,
}

/// Compiled profiles. Cheap to share across threads (`Arc` inside).
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
    dns_limits: DnsLimits,
}

/// The stack of the thread that loads profiles (only the pages used are
/// committed).
const LOADER_STACK_SIZE: usize = 256 << 20;

/// Collects profiles (by layer) and secrets, then loads them.
#[derive(Debug, Default)]
pub struct EngineBuilder {
    profiles: Vec<(Layer, ProfileSource)>,
    secrets: Option<Secrets>,
}

impl EngineBuilder {
    /// Adds a profile to a layer.
    pub fn profile(mut self, layer: Layer, source: ProfileSource) -> EngineBuilder {
        self.profiles.push((layer, source));
        self
    }

    /// Where `${secret:NAME}` values come from (default: the environment).
    pub fn secrets(mut self, secrets: Secrets) -> EngineBuilder {
        self.secrets = Some(secrets);
        self
    }

    /// Loads every profile: all problems are reported together.
    ///
    /// Loading runs on a thread of its own with a large stack: the CEL
    /// parser recurses once per level of nesting, and a hostile condition
    /// may nest as deep as its length allows before the engine can reject it.
    pub fn build(self) -> Result<Engine, ProfileError> {
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("policy-loader".into())
                .stack_size(LOADER_STACK_SIZE)
                .spawn_scoped(scope, || self.build_here())
                .map_err(ProfileError::Loader)?
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    fn build_here(self) -> Result<Engine, ProfileError> {
        let secrets = self.secrets.unwrap_or_else(Secrets::from_env);
        let env = condition::environment();
        let mut profiles = self.profiles;
        profiles.sort_by_key(|(layer, _)| *layer);

        let mut errors = Vec::new();
        let mut rules: Vec<Rule> = Vec::new();
        let mut locks: Vec<Lock> = Vec::new();
        let mut loaded = Vec::new();
        let mut names: HashMap<String, Location> = HashMap::new();
        let mut dns_limits = GivenDnsLimits::default();
        let mut secret_values: Vec<String> = Vec::new();
        for (order, (layer, source)) in profiles.iter().enumerate() {
            let text = match source.read() {
                Ok(text) => text,
                Err(error) => {
                    errors.push(error);
                    continue;
                }
            };
            let profile = match profile::parse(&text, &env, &secrets) {
                Ok(profile) => profile,
                Err(profile_errors) => {
                    errors.extend(profile_errors);
                    continue;
                }
            };
            dns_limits = dns_limits.merge(profile.dns_limits);
            for spec in profile.rules {
                if let Some(lock) = locks.iter().find(|lock| lock.section == spec.section) {
                    if spec.decision != RuleDecision::Block {
                        errors.push(spec.location.error(format!(
                            "rule `{}` is `{}` in section `{}`, which is locked by {} ({} layer): \
                             profiles loaded after the lock may only add block rules there",
                            spec.name, spec.decision, spec.section, lock.location, lock.layer
                        )));
                        continue;
                    }
                }
                if let Some(previous) = names.get(&spec.name) {
                    errors.push(
                        spec.location.error(format!("duplicate rule `{}`: already defined at {previous}", spec.name)),
                    );
                    continue;
                }
                names.insert(spec.name.clone(), spec.location.clone());
                secret_values.extend(spec.secret_values);
                rules.push(Rule {
                    name: spec.name,
                    section: spec.section,
                    event: spec.event,
                    decision: spec.decision,
                    priority: spec.priority,
                    condition: spec.condition,
                    condition_text: spec.condition_text,
                    actions: spec.actions,
                    mode: spec.mode,
                    description: spec.description,
                    location: spec.location,
                    layer: *layer,
                    order,
                });
            }
            // A profile's locks bind the profiles after it, not its own rules.
            locks.extend(profile.locks.into_iter().map(|LockSpec { section, location }| Lock {
                section,
                location,
                layer: *layer,
            }));
            loaded.push(LoadedProfile { name: text.name.clone(), layer: *layer, description: profile.description });
        }
        if !errors.is_empty() {
            return Err(ProfileError::from_list(errors));
        }
        let mut inner = Inner::new(Arc::new(env), rules, locks, loaded);
        secret_values.retain(|value| !value.is_empty());
        secret_values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secret_values.dedup();
        inner.secret_values = secret_values;
        Ok(Engine { inner: Arc::new(inner), dns_limits: dns_limits.resolve() })
    }
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("rules", &self.rules)
            .field("locks", &self.locks)
            .field("profiles", &self.profiles)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn new(env: Arc<Env>, rules: Vec<Rule>, locks: Vec<Lock>, profiles: Vec<LoadedProfile>) -> Inner {
        let mut deciding: [Vec<usize>; 4] = Default::default();
        let mut rewriting: [Vec<usize>; 4] = Default::default();
        for (index, rule) in rules.iter().enumerate() {
            let list = if rule.decision == RuleDecision::Rewrite { &mut rewriting } else { &mut deciding };
            list[rule.event.index()].push(index);
        }
        for list in &mut deciding {
            list.sort_by(|&a, &b| {
                let (a, b) = (&rules[a], &rules[b]);
                (a.priority, a.decision.tie_rank(), a.order, &a.name).cmp(&(
                    b.priority,
                    b.decision.tie_rank(),
                    b.order,
                    &b.name,
                ))
            });
        }
        for list in &mut rewriting {
            list.sort_by(|&a, &b| {
                let (a, b) = (&rules[a], &rules[b]);
                (a.priority, a.order, &a.name).cmp(&(b.priority, b.order, &b.name))
            });
        }
        Inner { env, rules, deciding, rewriting, locks, profiles, secret_values: Vec::new() }
    }

    /// Allow, block and ask rules for a kind, in precedence order.
    pub fn deciding(&self, kind: EventKind) -> impl Iterator<Item = &Rule> {
        self.deciding[kind.index()].iter().map(|&index| &self.rules[index])
    }

    /// Rewrite rules for a kind, in priority order.
    pub fn rewriting(&self, kind: EventKind) -> impl Iterator<Item = &Rule> {
        self.rewriting[kind.index()].iter().map(|&index| &self.rules[index])
    }

    /// The actions of the matching rewrite rules. For each header, and for
    /// the DNS answer, the first (lowest priority number) rule wins.
    fn actions(&self, event: &Event, cx: &EvalCx<'_, '_, '_>) -> Vec<Action> {
        let mut actions: Vec<Action> = Vec::new();
        for rule in self.rewriting(event.kind()) {
            if rule.condition.eval(cx) != Ok(true) {
                continue;
            }
            for action in &rule.actions {
                let taken = match action.header() {
                    Some(header) => actions.iter().any(|done| done.header() == Some(header)),
                    None => actions.iter().any(|done| matches!(done, Action::DnsAnswer { .. })),
                };
                if taken {
                    continue;
                }
                actions.push(match (action, event) {
                    (Action::DnsAnswer { records, ttl }, Event::DnsRequest(query)) => Action::DnsAnswer {
                        records: records.iter().filter(|r| answers(r, &query.qtype)).cloned().collect(),
                        ttl: *ttl,
                    },
                    _ => action.clone(),
                });
            }
        }
        actions
    }

    fn decide(&self, event: &Event, cx: &EvalCx<'_, '_, '_>) -> Verdict {
        match self.deciding(event.kind()).find(|rule| rule.matches(event, cx)) {
            None => Verdict { decision: Decision::Block, rule: None, actions: Vec::new(), mode: None },
            Some(rule) => {
                let decision = rule.decision.decision().unwrap_or(Decision::Block);
                let actions = if decision == Decision::Allow { self.actions(event, cx) } else { Vec::new() };
                let mode = if decision == Decision::Block { None } else { rule.mode };
                Verdict { decision, rule: Some(rule.name.clone()), actions, mode }
            }
        }
    }
}

/// Whether a synthesised record answers a query of type `qtype`.
fn answers(record: &DnsRecord, qtype: &str) -> bool {
    matches!(record, DnsRecord::Cname(_)) || qtype == "ANY" || record.type_name() == qtype
}

impl Engine {
    /// The values of the secrets (`${secret:NAME}`) that the loaded rules put
    /// into headers, longest first: what handlers must never log, and must
    /// keep from coming back to the guest. Never log these.
    pub fn secret_values(&self) -> &[String] {
        &self.inner.secret_values
    }

    /// Starts loading profiles into layers.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// Loads profile files in the order given, as successive profiles of the
    /// user layer: a lock in one binds the files after it. Secrets come from
    /// the environment.
    pub fn load(paths: &[PathBuf]) -> Result<Engine, ProfileError> {
        paths
            .iter()
            .fold(Engine::builder(), |builder, path| builder.profile(Layer::User, ProfileSource::File(path.clone())))
            .build()
    }

    /// Loads profiles into layers (in layer order, then in the order given).
    /// Secrets come from the environment.
    pub fn load_layers(profiles: &[(Layer, ProfileSource)]) -> Result<Engine, ProfileError> {
        profiles
            .iter()
            .fold(Engine::builder(), |builder, (layer, source)| builder.profile(*layer, source.clone()))
            .build()
    }

    /// The engine of one built-in profile.
    pub fn builtin(name: &str) -> Result<Engine, ProfileError> {
        Engine::builder().profile(Layer::Builtin, ProfileSource::Builtin(name.to_owned())).build()
    }

    /// Decide on one event. No matching rule means block.
    pub fn decide(&self, event: &Event) -> Verdict {
        condition::with_event(event, &self.inner.env, |cx| self.inner.decide(event, cx))
    }

    /// The rewrite actions that apply to `event` once it is allowed (after
    /// an `ask` was answered yes).
    pub(crate) fn actions(&self, event: &Event) -> Vec<Action> {
        condition::with_event(event, &self.inner.env, |cx| self.inner.actions(event, cx))
    }

    /// Decides on `event` and says why: the verdict, the deciding rule and
    /// what every rule made of the event.
    pub fn explain(&self, event: &Event) -> Explanation {
        let inner = &*self.inner;
        let kind = event.kind();
        condition::with_event(event, &inner.env, |cx| {
            let verdict = inner.decide(event, cx);
            let mut rules = Vec::with_capacity(inner.rules.len());
            for rule in inner.deciding(kind).chain(inner.rewriting(kind)) {
                let outcome = match (rule.unnamed_gate(event), rule.condition.eval(cx)) {
                    (Some(gate), _) => Outcome::GateNotNamed(gate),
                    (None, Ok(true)) => Outcome::Matched,
                    (None, Ok(false)) => Outcome::NotMatched,
                    (None, Err(error)) => Outcome::Failed {
                        error: error.to_string(),
                        counts_as_match: rule.decision == RuleDecision::Block,
                    },
                };
                rules.push(RuleTrace { rule: RuleInfo::new(rule), outcome });
            }
            for rule in inner.rules.iter().filter(|rule| rule.event != kind) {
                rules.push(RuleTrace { rule: RuleInfo::new(rule), outcome: Outcome::OtherEvent(rule.event) });
            }
            Explanation { event: event.clone(), verdict, rules }
        })
    }

    /// The DNS limits: for each key the strictest value any profile gives,
    /// the default where none does.
    pub fn dns_limits(&self) -> DnsLimits {
        self.dns_limits
    }

    /// What the engine holds: profiles, locks and rules.
    pub fn summary(&self) -> Summary {
        Summary::new(&self.inner)
    }
}

/// Loads profiles (as [`Engine::load_layers`] does) and summarises them: what
/// `sandbox policy check` prints. Errors list every problem found.
pub fn check(profiles: &[(Layer, ProfileSource)]) -> Result<Summary, ProfileError> {
    Engine::load_layers(profiles).map(|engine| engine.summary())
}
