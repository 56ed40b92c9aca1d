//! Table-driven tests of decisions: precedence, ties, no match, layers and
//! locks, rewrite actions, secrets, DNS synthesis, explanations and the
//! built-in profiles.

use std::net::{Ipv4Addr, Ipv6Addr};

use policy::{Action, Decision, DnsRecord, Engine, Event, Layer, ProfileError, ProfileSource, Secrets, Verdict};

fn text(name: &str, text: &str) -> ProfileSource {
    ProfileSource::Text { name: name.to_owned(), text: text.to_owned() }
}

fn secrets() -> Secrets {
    Secrets::none().with_value("TOKEN", "t0k3n-value").with_value("USER", "alice")
}

fn layered(profiles: &[(Layer, &str, &str)]) -> Result<Engine, ProfileError> {
    profiles
        .iter()
        .fold(Engine::builder().secrets(secrets()), |builder, (layer, name, profile)| {
            builder.profile(*layer, text(name, profile))
        })
        .build()
}

fn engine(profile: &str) -> Engine {
    layered(&[(Layer::User, "p.toml", profile)]).unwrap_or_else(|error| panic!("{error}"))
}

fn event(json: &str) -> Event {
    Event::from_json(json).unwrap_or_else(|error| panic!("{json}: {error}"))
}

/// A rule on `http.request` for host `x.com` (or any host, without `if`).
fn rule(name: &str, decision: &str, priority: u32, condition: Option<&str>) -> String {
    let mut rule = format!(
        "[security.rules.http.{name}]\non = \"http.request\"\ndecision = \"{decision}\"\npriority = {priority}\n"
    );
    if let Some(condition) = condition {
        rule.push_str(&format!("if = '{condition}'\n"));
    }
    if decision == "rewrite" {
        rule.push_str(&format!("set_request_headers = {{ \"x-{name}\" = \"1\" }}\n"));
    }
    rule + "\n"
}

const X: Option<&str> = Some(r#"http.request.host == "x.com""#);
const GET_X: &str = r#"{"event": "http.request", "host": "x.com"}"#;

#[test]
fn precedence_ties_and_no_match() {
    let missing_header = Some(r#"http.request.headers["x-missing"] == "1""#);
    // (what, rules, event, expected decision, expected deciding rule)
    let cases: Vec<(&str, String, &str, Decision, Option<&str>)> = vec![
        ("no rules: block", String::new(), GET_X, Decision::Block, None),
        ("a matching allow", rule("a", "allow", 10, X), GET_X, Decision::Allow, Some("http.a")),
        (
            "an allow that does not match",
            rule("a", "allow", 10, Some(r#"http.request.host == "y.com""#)),
            GET_X,
            Decision::Block,
            None,
        ),
        (
            "lower number wins: block",
            rule("b", "block", 5, X) + &rule("a", "allow", 10, X),
            GET_X,
            Decision::Block,
            Some("http.b"),
        ),
        (
            "lower number wins: allow",
            rule("a", "allow", 5, X) + &rule("b", "block", 10, X),
            GET_X,
            Decision::Allow,
            Some("http.a"),
        ),
        (
            "priority 0 beats 1000",
            rule("a", "allow", 1000, X) + &rule("b", "block", 0, X),
            GET_X,
            Decision::Block,
            Some("http.b"),
        ),
        (
            "tie: block beats allow",
            rule("a", "allow", 10, X) + &rule("b", "block", 10, X),
            GET_X,
            Decision::Block,
            Some("http.b"),
        ),
        (
            "tie: ask beats allow",
            rule("a", "allow", 10, X) + &rule("b", "ask", 10, X),
            GET_X,
            Decision::Ask,
            Some("http.b"),
        ),
        (
            "tie: block beats ask",
            rule("a", "ask", 10, X) + &rule("b", "block", 10, X),
            GET_X,
            Decision::Block,
            Some("http.b"),
        ),
        (
            "tie between allows: first by name",
            rule("b", "allow", 10, X) + &rule("a", "allow", 10, X),
            GET_X,
            Decision::Allow,
            Some("http.a"),
        ),
        (
            "ask with a lower number than allow",
            rule("a", "allow", 10, X) + &rule("b", "ask", 5, X),
            GET_X,
            Decision::Ask,
            Some("http.b"),
        ),
        ("rewrite never decides", rule("a", "rewrite", 1, X), GET_X, Decision::Block, None),
        ("a rule without `if` matches its event", rule("a", "allow", 10, None), GET_X, Decision::Allow, Some("http.a")),
        (
            "rules for other events do not apply",
            "[security.rules.dns.a]\non = \"dns.request\"\ndecision = \"allow\"\n".to_owned(),
            GET_X,
            Decision::Block,
            None,
        ),
        (
            "responses need rules of their own",
            rule("a", "allow", 10, None),
            r#"{"event": "http.response", "status": 200, "request": {"host": "x.com"}}"#,
            Decision::Block,
            None,
        ),
        (
            "a failing condition matches a block rule (fail closed)",
            rule("a", "allow", 10, X) + &rule("b", "block", 5, missing_header),
            GET_X,
            Decision::Block,
            Some("http.b"),
        ),
        (
            "a failing condition does not match an allow rule",
            rule("a", "allow", 5, missing_header) + &rule("b", "ask", 10, X),
            GET_X,
            Decision::Ask,
            Some("http.b"),
        ),
        (
            "a failing condition does not match an ask rule",
            rule("a", "ask", 5, missing_header),
            GET_X,
            Decision::Block,
            None,
        ),
        (
            "false && failure is false, not a failure",
            rule("a", "block", 5, Some(r#"http.request.host == "y.com" && http.request.headers["x"] == "1""#))
                + &rule("b", "allow", 10, X),
            GET_X,
            Decision::Allow,
            Some("http.b"),
        ),
    ];
    for (what, rules, json, decision, deciding) in cases {
        let verdict = engine(&rules).decide(&event(json));
        assert_eq!((verdict.decision, verdict.rule.as_deref()), (decision, deciding), "{what}");
        if decision != Decision::Allow {
            assert!(verdict.actions.is_empty(), "{what}: actions on a {decision} verdict");
        }
    }
}

#[test]
fn tcp_and_dns_rules_decide_their_events() {
    let engine = engine(
        r#"
[security.rules.tcp.db]
on = "tcp.connect"
if = 'tcp.connect.host == "db.internal" && tcp.connect.port == 5432 && tcp.connect.ip.startsWith("10.")'
decision = "allow"

[security.rules.tcp.ssh]
on = "tcp.connect"
if = 'tcp.connect.port == 22'
decision = "block"
priority = 1

[security.rules.dns.example]
on = "dns.request"
if = 'dns.request.qname.endsWith(".example.com") && dns.request.qtype in ["A", "AAAA"]'
decision = "allow"
"#,
    );
    for (json, decision) in [
        (r#"{"event": "tcp.connect", "host": "db.internal", "ip": "10.1.2.3", "port": 5432}"#, Decision::Allow),
        (r#"{"event": "tcp.connect", "host": "db.internal", "ip": "192.168.1.1", "port": 5432}"#, Decision::Block),
        (r#"{"event": "tcp.connect", "host": "db.internal", "port": 5432}"#, Decision::Block),
        (r#"{"event": "tcp.connect", "host": "db.internal", "ip": "10.1.2.3", "port": 22}"#, Decision::Block),
        (r#"{"event": "dns.request", "qname": "www.example.com", "qtype": "AAAA"}"#, Decision::Allow),
        (r#"{"event": "dns.request", "qname": "www.example.com", "qtype": "TXT"}"#, Decision::Block),
        (r#"{"event": "dns.request", "qname": "example.com"}"#, Decision::Block),
    ] {
        assert_eq!(engine.decide(&event(json)).decision, decision, "{json}");
    }
}

const CORPORATE_LOCKS_HTTP: &str = r#"
[security]
locks = ["http"]

[security.rules.http.corp_allow_internal]
on = "http.request"
if = 'http.request.host == "intranet.corp"'
decision = "allow"
priority = 50

[security.rules.http.corp_block_paste]
on = "http.request"
if = 'http.request.host == "paste.example"'
decision = "block"
priority = 500
"#;

#[test]
fn layers_and_locks() {
    let allow_paste = "[security.rules.http.user_paste]\non = \"http.request\"\nif = 'http.request.host == \"paste.example\"'\ndecision = \"allow\"\npriority = 1\n";
    let ask_paste = allow_paste.replace("\"allow\"", "\"ask\"");
    let rewrite_paste = allow_paste.replace("\"allow\"", "\"rewrite\"") + "remove_request_headers = [\"cookie\"]\n";
    let block_intranet = "[security.rules.http.user_no_intranet]\non = \"http.request\"\nif = 'http.request.host == \"intranet.corp\"'\ndecision = \"block\"\npriority = 900\n";
    let allow_dns = "[security.rules.dns.user_dns]\non = \"dns.request\"\ndecision = \"allow\"\n";
    let unlocked = CORPORATE_LOCKS_HTTP.replace("locks = [\"http\"]", "");
    let unlocked_elsewhere = unlocked.replace("intranet.corp", "other.corp");
    let paste = r#"{"event": "http.request", "host": "paste.example"}"#;
    let intranet = r#"{"event": "http.request", "host": "intranet.corp"}"#;
    let lock_error = |rule: &str, decision: &str| {
        format!(
            "user.toml:1:22: rule `http.{rule}` is `{decision}` in section `http`, which is locked by corp.toml:3:11 \
             (corporate layer): profiles loaded after the lock may only add block rules there"
        )
    };

    // (what, profiles, event, expected verdict or error)
    type Case<'a> = (&'a str, Vec<(Layer, &'a str, &'a str)>, &'a str, Result<(Decision, &'a str), String>);
    let cases: Vec<Case> = vec![
        (
            "without a lock a user rule with a lower number wins",
            vec![(Layer::Corporate, "corp.toml", &unlocked), (Layer::User, "user.toml", allow_paste)],
            paste,
            Ok((Decision::Allow, "http.user_paste")),
        ),
        (
            "a lock rejects an allow rule in the locked section",
            vec![(Layer::Corporate, "corp.toml", CORPORATE_LOCKS_HTTP), (Layer::User, "user.toml", allow_paste)],
            paste,
            Err(lock_error("user_paste", "allow")),
        ),
        (
            "a lock rejects an ask rule",
            vec![(Layer::Corporate, "corp.toml", CORPORATE_LOCKS_HTTP), (Layer::User, "user.toml", &ask_paste)],
            paste,
            Err(lock_error("user_paste", "ask")),
        ),
        (
            "a lock rejects a rewrite rule",
            vec![(Layer::Corporate, "corp.toml", CORPORATE_LOCKS_HTTP), (Layer::User, "user.toml", &rewrite_paste)],
            paste,
            Err(lock_error("user_paste", "rewrite")),
        ),
        (
            "a lock binds the command-line layer too",
            vec![(Layer::Corporate, "corp.toml", CORPORATE_LOCKS_HTTP), (Layer::Flags, "user.toml", allow_paste)],
            paste,
            Err(lock_error("user_paste", "allow")),
        ),
        (
            "layers load in layer order whatever the order given",
            vec![(Layer::User, "user.toml", allow_paste), (Layer::Corporate, "corp.toml", CORPORATE_LOCKS_HTTP)],
            paste,
            Err(lock_error("user_paste", "allow")),
        ),
        (
            "block rules may be added to a locked section",
            vec![(Layer::Corporate, "corp.toml", CORPORATE_LOCKS_HTTP), (Layer::User, "user.toml", block_intranet)],
            intranet,
            Ok((Decision::Allow, "http.corp_allow_internal")),
        ),
        (
            "the corporate rules apply under a lock",
            vec![(Layer::Corporate, "corp.toml", CORPORATE_LOCKS_HTTP), (Layer::User, "user.toml", block_intranet)],
            paste,
            Ok((Decision::Block, "http.corp_block_paste")),
        ),
        (
            "other sections stay open",
            vec![(Layer::Corporate, "corp.toml", CORPORATE_LOCKS_HTTP), (Layer::User, "user.toml", allow_dns)],
            r#"{"event": "dns.request", "qname": "anything.example"}"#,
            Ok((Decision::Allow, "dns.user_dns")),
        ),
        (
            "a lock does not bind the profile declaring it",
            vec![(Layer::Corporate, "corp.toml", CORPORATE_LOCKS_HTTP)],
            intranet,
            Ok((Decision::Allow, "http.corp_allow_internal")),
        ),
        (
            "rule names are unique across layers",
            vec![(Layer::Corporate, "corp.toml", &unlocked), (Layer::User, "user.toml", &unlocked_elsewhere)],
            intranet,
            Err("user.toml:5:22: duplicate rule `http.corp_allow_internal`: already defined at corp.toml:5:22\n\
                 user.toml:11:22: duplicate rule `http.corp_block_paste`: already defined at corp.toml:11:22"
                .to_owned()),
        ),
    ];
    for (what, profiles, json, expected) in cases {
        let result = layered(&profiles).map(|engine| engine.decide(&event(json)));
        match (result, expected) {
            (Ok(verdict), Ok((decision, rule))) => {
                assert_eq!((verdict.decision, verdict.rule.as_deref()), (decision, Some(rule)), "{what}")
            }
            (Err(error), Err(message)) => assert_eq!(error.to_string(), message, "{what}"),
            (result, expected) => panic!("{what}: got {result:?}, expected {expected:?}"),
        }
    }
}

#[test]
fn load_treats_files_in_order_as_successive_layers() {
    let dir = tempfile::tempdir().unwrap();
    let corp = dir.path().join("corp.toml");
    let user = dir.path().join("user.toml");
    std::fs::write(&corp, CORPORATE_LOCKS_HTTP).unwrap();
    std::fs::write(&user, rule("mine", "allow", 1, X)).unwrap();
    let error = Engine::load(&[corp.clone(), user.clone()]).unwrap_err().to_string();
    assert!(error.contains("rule `http.mine` is `allow` in section `http`, which is locked by"), "{error}");
    assert!(error.contains("corp.toml:3:11 (user layer)"), "{error}");
    // The other way round the lock comes last and binds nothing.
    let engine = Engine::load(&[user, corp]).unwrap();
    assert_eq!(engine.decide(&event(GET_X)).decision, Decision::Allow);
    let missing = dir.path().join("missing.toml");
    let error = Engine::load(&[missing]).unwrap_err().to_string();
    assert!(error.contains("missing.toml: No such file or directory"), "{error}");
}

#[test]
fn every_problem_in_every_profile_is_reported() {
    let first = "[security.rules.http.a]\non = \"http.request\"\ndecision = \"alow\"\n\n[security.rules.http.b]\non = \"http.request\"\nif = 'http.request.hots == \"x\"'\ndecision = \"allow\"\n";
    let second = "[security]\nlocks = [\"tpc\"]\n";
    let error = layered(&[(Layer::Corporate, "one.toml", first), (Layer::User, "two.toml", second)]).unwrap_err();
    assert_eq!(
        error.to_string(),
        "one.toml:3:13: unknown decision `alow` (decisions: allow, block, ask, rewrite)\n\
         one.toml:7:19: unknown field `hots` of `http.request` (fields: host, sni, method, path, raw_path, query, scheme, port, headers)\n\
         two.toml:2:11: unknown section `tpc` in locks (sections: dns, http, tcp)"
    );
    assert_eq!(error.problems().len(), 3);
}

const REWRITES: &str = r#"
[security.rules.http.allow_api]
on = "http.request"
if = 'http.request.host == "api.example.com"'
decision = "allow"

[security.rules.http.key]
on = "http.request"
if = 'http.request.host == "api.example.com"'
decision = "rewrite"
priority = 10
set_request_headers = { authorization = "Bearer ${secret:TOKEN}", "x-user" = "${secret:USER}@${secret:USER}", "X-Plain" = "yes" }
remove_request_headers = ["cookie"]

[security.rules.http.other_key]
on = "http.request"
if = 'http.request.host.endsWith("example.com")'
decision = "rewrite"
priority = 20
set_request_headers = { authorization = "Bearer other", cookie = "c=1", "x-extra" = "1" }

[security.rules.http.responses]
on = "http.response"
decision = "allow"

[security.rules.http.strip_cookies]
on = "http.response"
decision = "rewrite"
remove_response_headers = ["set-cookie"]
set_response_headers = { "x-sandbox" = "1" }
"#;

#[test]
fn rewrites_apply_to_allowed_traffic_lowest_number_first_per_header() {
    let engine = engine(REWRITES);
    let verdict =
        engine.decide(&event(r#"{"event": "http.request", "host": "api.example.com", "headers": {"cookie": "a"}}"#));
    assert_eq!(verdict.decision, Decision::Allow);
    assert_eq!(
        verdict.actions,
        vec![
            Action::RemoveRequestHeader("cookie".into()),
            // within one rule, in the order of the names as written ("X-Plain" < "authorization")
            Action::SetRequestHeader("x-plain".into(), policy::SecretValue::plain("yes")),
            Action::SetRequestHeader("authorization".into(), policy::SecretValue::secret("Bearer t0k3n-value")),
            Action::SetRequestHeader("x-user".into(), policy::SecretValue::secret("alice@alice")),
            Action::SetRequestHeader("x-extra".into(), policy::SecretValue::plain("1")),
        ]
    );
    // Traffic that is not allowed gets no actions even when rewrites match.
    let verdict = engine.decide(&event(r#"{"event": "http.request", "host": "www.example.com"}"#));
    assert_eq!((verdict.decision, verdict.actions.len()), (Decision::Block, 0));
    let verdict = engine.decide(&event(r#"{"event": "http.response", "status": 200, "request": {"host": "x.org"}}"#));
    assert_eq!(
        verdict.actions,
        vec![
            Action::RemoveResponseHeader("set-cookie".into()),
            Action::SetResponseHeader("x-sandbox".into(), policy::SecretValue::plain("1")),
        ]
    );
}

#[test]
fn encoded_path_cannot_bypass_prefix_rule() {
    let engine = engine(
        r#"
[security.rules.http.no_admin]
on = "http.request"
if = 'http.request.path.startsWith("/admin")'
decision = "block"
priority = 1

[security.rules.http.encoded_raw]
on = "http.request"
if = 'http.request.raw_path.contains("%")'
decision = "ask"
priority = 2

[security.rules.http.public]
on = "http.request"
if = 'http.request.path.startsWith("/public/")'
decision = "allow"
priority = 5
"#,
    );
    let decide = |path: &str| {
        let json = format!(r#"{{"event": "http.request", "host": "x.com", "path": "{path}"}}"#);
        let verdict = engine.decide(&event(&json));
        (verdict.decision, verdict.rule)
    };
    let blocked = (Decision::Block, Some("http.no_admin".to_owned()));
    for path in [
        "/admin",
        "/%61dmin",
        "/%61%64%6D%69%6e/users",
        "//admin",
        "///admin//x",
        "/./admin",
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E//%2e/admin",
        "/x/y/../../admin",
        "/../admin",
    ] {
        assert_eq!(decide(path), blocked, "{path}");
    }
    // The raw path stays available to conditions as sent.
    assert_eq!(decide("/public/%7Euser"), (Decision::Ask, Some("http.encoded_raw".to_owned())));
    assert_eq!(decide("/public/a/./b"), (Decision::Allow, Some("http.public".to_owned())));
    // An allow on a prefix cannot be climbed out of.
    assert_eq!(decide("/public/../private").0, Decision::Block);
    match event(r#"{"event": "http.request", "host": "x.com", "path": "//a/%62/../%2f"}"#) {
        Event::HttpRequest(request) => {
            assert_eq!(request.path, "/a/%2F");
            assert_eq!(request.raw_path, "//a/%62/../%2f");
        }
        other => panic!("{other:?}"),
    }
    // raw_path is checked at load like every field: a string of http events.
    for (event_kind, condition) in
        [("http.request", "http.request.raw_path == 1"), ("dns.request", r#"http.request.raw_path == "/""#)]
    {
        let profile = format!(
            "[security.rules.{}.a]\non = \"{event_kind}\"\nif = '{condition}'\ndecision = \"allow\"\n",
            &event_kind[..event_kind.find('.').unwrap_or(0)]
        );
        let error = layered(&[(Layer::User, "p.toml", &profile)]).unwrap_err().to_string();
        assert!(error.contains("p.toml:3:"), "{error}");
    }
}

#[test]
fn secret_values_are_listed_for_redaction_longest_first() {
    assert_eq!(engine(REWRITES).secret_values(), ["t0k3n-value", "alice"]);
    assert!(engine(&rule("a", "allow", 1, None)).secret_values().is_empty());
}

#[test]
fn secrets_are_filled_at_load_and_never_shown() {
    let engine = engine(REWRITES);
    let event = event(r#"{"event": "http.request", "host": "api.example.com"}"#);
    let verdict = engine.decide(&event);
    let Some(Action::SetRequestHeader(_, value)) =
        verdict.actions.iter().find(|a| matches!(a, Action::SetRequestHeader(name, _) if name == "authorization"))
    else {
        panic!("no authorization header: {verdict:?}");
    };
    assert!(value.is_secret());
    assert_eq!(value.expose(), "Bearer t0k3n-value");
    assert_eq!(value.redacted(), "[REDACTED]");
    for shown in [
        format!("{verdict:?}"),
        verdict.actions.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"),
        engine.explain(&event).to_string(),
        format!("{:?}", engine.explain(&event)),
        engine.summary().to_string(),
        format!("{engine:?}"),
        format!("{:?}", secrets()),
    ] {
        assert!(!shown.contains("t0k3n") && !shown.contains("alice"), "a secret is shown: {shown}");
    }
    assert!(engine.explain(&event).to_string().contains("set request header authorization: [REDACTED]"));
}

#[test]
fn secrets_come_from_files_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.toml");
    std::fs::write(&file, "FROM_FILE = \"file-value\"\n").unwrap();
    let variable = "SANDBOX_POLICY_TEST_SECRET_FROM_ENV";
    std::env::set_var(variable, "env-value");
    let profile = format!(
        "[security.rules.http.a]\non = \"http.request\"\ndecision = \"allow\"\n\n\
         [security.rules.http.b]\non = \"http.request\"\ndecision = \"rewrite\"\n\
         set_request_headers = {{ \"x-file\" = \"${{secret:FROM_FILE}}\", \"x-env\" = \"${{secret:{variable}}}\" }}\n"
    );
    let engine = Engine::builder()
        .profile(Layer::User, text("p.toml", &profile))
        .secrets(Secrets::from_env().with_file(&file).unwrap())
        .build()
        .unwrap();
    let actions = engine.decide(&event(GET_X)).actions;
    let values: Vec<(&str, &str)> = actions
        .iter()
        .filter_map(|action| match action {
            Action::SetRequestHeader(name, value) => Some((name.as_str(), value.expose())),
            _ => None,
        })
        .collect();
    assert_eq!(values, vec![("x-env", "env-value"), ("x-file", "file-value")]);
    // Without the environment the variable is not found, and the error says where it looked.
    let error = Engine::builder()
        .profile(Layer::User, text("p.toml", &profile))
        .secrets(Secrets::none().with_file(&file).unwrap())
        .build()
        .unwrap_err()
        .to_string();
    assert_eq!(error, format!("p.toml:8:70: secret `{variable}` is not set (looked in {})", file.display()));
    assert!(!error.contains("env-value"));
}

const DNS_ANSWERS: &str = r#"
[security.rules.dns.allow_internal]
on = "dns.request"
if = 'dns.request.qname.endsWith(".internal")'
decision = "allow"

[security.rules.dns.db]
on = "dns.request"
if = 'dns.request.qname == "db.internal"'
decision = "rewrite"
priority = 10
answer = { ttl = 30, a = ["10.0.0.7", "10.0.0.8"], aaaa = ["fd00::7"], txt = ["v=db"] }

[security.rules.dns.fallback]
on = "dns.request"
if = 'dns.request.qname.endsWith(".internal")'
decision = "rewrite"
priority = 20
answer = { a = ["10.9.9.9"] }

[security.rules.dns.alias]
on = "dns.request"
if = 'dns.request.qname == "www.internal"'
decision = "rewrite"
priority = 5
answer = { cname = "Web.Internal." }

[security.rules.dns.blocked_answer]
on = "dns.request"
if = 'dns.request.qname == "blocked.example"'
decision = "rewrite"
answer = { a = ["10.0.0.1"] }
"#;

#[test]
fn dns_answers_are_synthesised_for_the_query_type() {
    let engine = engine(DNS_ANSWERS);
    let a = |last: u8| DnsRecord::A(Ipv4Addr::new(10, 0, 0, last));
    // (query name, type, expected records and ttl, or no answer action)
    type Answer = (Vec<DnsRecord>, u32);
    let cases: Vec<(&str, &str, Option<Answer>)> = vec![
        ("db.internal", "A", Some((vec![a(7), a(8)], 30))),
        ("db.internal", "AAAA", Some((vec![DnsRecord::Aaaa("fd00::7".parse::<Ipv6Addr>().unwrap())], 30))),
        ("db.internal", "TXT", Some((vec![DnsRecord::Txt("v=db".into())], 30))),
        ("db.internal", "MX", Some((vec![], 30))),
        // ANY is not a common type: only a rule naming dns.request.qtype
        // allows it (see uncommon_record_types_need_a_rule_naming_the_type).
        ("db.internal", "ANY", None),
        ("cache.internal", "A", Some((vec![DnsRecord::A(Ipv4Addr::new(10, 9, 9, 9))], 60))),
        ("www.internal", "AAAA", Some((vec![DnsRecord::Cname("web.internal".into())], 60))),
        ("blocked.example", "A", None),
    ];
    for (qname, qtype, expected) in cases {
        let verdict =
            engine.decide(&event(&format!(r#"{{"event": "dns.request", "qname": "{qname}", "qtype": "{qtype}"}}"#)));
        let answers: Vec<Answer> = verdict
            .actions
            .iter()
            .filter_map(|action| match action {
                Action::DnsAnswer { records, ttl } => Some((records.clone(), *ttl)),
                _ => None,
            })
            .collect();
        match expected {
            Some(expected) => assert_eq!(answers, vec![expected], "{qname} {qtype}"),
            None => assert_eq!((verdict.decision, answers.len()), (Decision::Block, 0), "{qname} {qtype}"),
        }
    }
}

#[test]
fn explain_reports_the_decision_and_every_rule() {
    let profile = rule("a_allow", "allow", 10, X)
        + &rule("b_block", "block", 5, Some(r#"http.request.method == "POST""#))
        + &rule("c_fails", "allow", 1, Some(r#"http.request.headers["x-missing"] == "1""#))
        + &rule("d_rewrite", "rewrite", 50, X)
        + "[security.rules.dns.names]\non = \"dns.request\"\ndecision = \"allow\"\n";
    let engine = engine(&profile);
    let explanation = engine.explain(&event(r#"{"event": "http.request", "host": "x.com", "method": "POST"}"#));
    assert_eq!(explanation.verdict, engine.decide(&explanation.event));
    let text = explanation.to_string();
    for expected in [
        "event: http.request POST https://x.com/",
        "decision: block by rule http.b_block (priority 5, p.toml:7:22)",
        "http.c_fails [allow priority 1, user layer, p.toml:13:22]: not matched: the condition failed (No such key: x-missing)",
        "http.b_block [block priority 5, user layer, p.toml:7:22]: matched; it decides",
        "http.a_allow [allow priority 10, user layer, p.toml:1:22]: matched; outranked by http.b_block (lower priority number)",
        "http.d_rewrite [rewrite priority 50, user layer, p.toml:19:22]: matched; its actions do not apply: the traffic is not allowed",
        "dns.names [allow priority 100, user layer, p.toml:26:21]: not evaluated: it is for dns.request events",
        "      if http.request.method == \"POST\"",
        "actions: none",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    let text = engine.explain(&event(GET_X)).to_string();
    assert!(text.contains("decision: allow by rule http.a_allow"), "{text}");
    assert!(text.contains("actions:\n  set request header x-d_rewrite: 1"), "{text}");
    let text = engine.explain(&event(r#"{"event": "http.request", "host": "y.com"}"#)).to_string();
    assert!(text.contains("decision: block (no rule matched; no match means block)"), "{text}");
}

#[test]
fn explain_agrees_with_decide() {
    let engines = [engine(REWRITES), engine(DNS_ANSWERS), Engine::builtin("dev").unwrap()];
    let events = [
        GET_X,
        r#"{"event": "http.request", "host": "api.example.com", "method": "DELETE"}"#,
        r#"{"event": "http.request", "host": "github.com", "method": "POST", "path": "/a/b.git/git-receive-pack"}"#,
        r#"{"event": "http.response", "status": 500, "request": {"host": "pypi.org"}}"#,
        r#"{"event": "dns.request", "qname": "db.internal", "qtype": "AAAA"}"#,
        r#"{"event": "dns.request", "qname": "pypi.org"}"#,
        r#"{"event": "tcp.connect", "host": "x", "port": 1}"#,
    ];
    for engine in &engines {
        for json in events {
            let event = event(json);
            assert_eq!(engine.explain(&event).verdict, engine.decide(&event), "{json}");
        }
    }
}

#[test]
fn the_dev_profile_allows_registries_and_github_reads_only() {
    let dev = Engine::load_layers(&[(Layer::Builtin, ProfileSource::from_arg("dev"))]).unwrap();
    let request = |host: &str, method: &str, path: &str| {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        event(&format!(
            r#"{{"event": "http.request", "host": "{host}", "method": "{method}", "path": "{path}", "query": "{query}"}}"#
        ))
    };
    for (host, method, path, decision) in [
        ("pypi.org", "GET", "/simple/requests/", Decision::Allow),
        ("files.pythonhosted.org", "GET", "/packages/x.whl", Decision::Allow),
        ("pypi.org", "POST", "/legacy/", Decision::Block),
        ("registry.npmjs.org", "GET", "/left-pad", Decision::Allow),
        ("registry.npmjs.org", "PUT", "/left-pad", Decision::Block),
        ("index.crates.io", "GET", "/se/rd/serde", Decision::Allow),
        ("static.crates.io", "HEAD", "/crates/serde/serde-1.0.0.crate", Decision::Allow),
        ("github.com", "GET", "/rust-lang/rust", Decision::Allow),
        ("github.com", "GET", "/a/b.git/info/refs?service=git-upload-pack", Decision::Allow),
        ("github.com", "POST", "/a/b.git/git-upload-pack", Decision::Allow),
        ("github.com", "GET", "/a/b.git/info/refs?service=git-receive-pack", Decision::Block),
        ("github.com", "POST", "/a/b.git/git-receive-pack", Decision::Block),
        ("api.github.com", "GET", "/repos/a/b", Decision::Allow),
        ("api.github.com", "POST", "/repos/a/b/issues", Decision::Block),
        ("raw.githubusercontent.com", "GET", "/a/b/main/README.md", Decision::Allow),
        ("evil.example", "GET", "/", Decision::Block),
    ] {
        assert_eq!(dev.decide(&request(host, method, path)).decision, decision, "{method} {host}{path}");
    }
    for (json, decision) in [
        (r#"{"event": "dns.request", "qname": "pypi.org"}"#, Decision::Allow),
        (r#"{"event": "dns.request", "qname": "objects.githubusercontent.com", "qtype": "AAAA"}"#, Decision::Allow),
        (r#"{"event": "dns.request", "qname": "evil.example"}"#, Decision::Block),
        (r#"{"event": "http.response", "status": 200, "request": {"host": "pypi.org"}}"#, Decision::Allow),
        (r#"{"event": "http.response", "status": 200, "request": {"host": "evil.example"}}"#, Decision::Block),
        (r#"{"event": "tcp.connect", "host": "pypi.org", "port": 22}"#, Decision::Block),
    ] {
        assert_eq!(dev.decide(&event(json)).decision, decision, "{json}");
    }
}

#[test]
fn deny_all_blocks_everything_and_built_ins_load_by_name() {
    let deny = Engine::builtin("deny-all").unwrap();
    for json in [
        GET_X,
        r#"{"event": "dns.request", "qname": "pypi.org"}"#,
        r#"{"event": "http.response", "status": 200, "request": {"host": "pypi.org"}}"#,
        r#"{"event": "tcp.connect", "host": "x", "port": 443}"#,
    ] {
        assert_eq!(
            deny.decide(&event(json)),
            Verdict { decision: Decision::Block, rule: None, actions: vec![], mode: None }
        );
    }
    assert_eq!(ProfileSource::from_arg("dev"), ProfileSource::Builtin("dev".into()));
    assert_eq!(ProfileSource::from_arg("./dev"), ProfileSource::File("./dev".into()));
    assert_eq!(
        Engine::builtin("allow-all").unwrap_err().to_string(),
        "unknown built-in profile `allow-all` (built-in profiles: deny-all, dev)"
    );
    let summary = policy::check(&[(Layer::Builtin, ProfileSource::Builtin("dev".into()))]).unwrap().to_string();
    assert!(summary.starts_with("ok: 7 rules from 1 profile\nprofile builtin:dev (built-in layer)"), "{summary}");
    assert!(summary.contains("http.github_no_push [block priority 10] builtin:dev:"), "{summary}");
}

#[test]
fn one_engine_decides_on_many_threads() {
    fn shareable<T: Send + Sync + Clone>(_: &T) {}
    let engine = Engine::builtin("dev").unwrap();
    shareable(&engine);
    shareable(&policy::Policy::new(engine.clone()));
    let allowed = event(r#"{"event": "http.request", "host": "pypi.org"}"#);
    let blocked = event(r#"{"event": "http.request", "host": "evil.example"}"#);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            let engine = engine.clone();
            let (allowed, blocked) = (&allowed, &blocked);
            scope.spawn(move || {
                for _ in 0..1000 {
                    assert_eq!(engine.decide(allowed).decision, Decision::Allow);
                    assert_eq!(engine.decide(blocked).decision, Decision::Block);
                }
            });
        }
    });
}

#[test]
fn only_rules_naming_the_port_allow_http_beyond_443() {
    let hosts = engine(&format!(
        "{}{}{}",
        rule("any_x", "allow", 10, X),
        rule("x_8443", "allow", 20, Some(r#"http.request.host == "x.com" && http.request.port == 8443"#)),
        rule("block_y_everywhere", "block", 30, Some(r#"http.request.host == "y.com""#)),
    ));
    let at =
        |host: &str, port: u16| event(&format!(r#"{{"event": "http.request", "host": "{host}", "port": {port}}}"#));
    let decided = |event: &Event| {
        let verdict = hosts.decide(event);
        (verdict.decision, verdict.rule)
    };
    // A rule for the host alone allows 443 and nothing else.
    assert_eq!(decided(&at("x.com", 443)), (Decision::Allow, Some("http.any_x".into())));
    assert_eq!(decided(&at("x.com", 10443)), (Decision::Block, None));
    assert_eq!(decided(&at("x.com", 22)), (Decision::Block, None));
    // A rule that names the port allows exactly that port.
    assert_eq!(decided(&at("x.com", 8443)), (Decision::Allow, Some("http.x_8443".into())));
    // Block rules need not name the port.
    assert_eq!(decided(&at("y.com", 8080)), (Decision::Block, Some("http.block_y_everywhere".into())));
    // Responses are screened by their own rules: the request was already
    // allowed by a rule naming the port.
    let response = event(r#"{"event": "http.response", "status": 200, "request": {"host": "x.com", "port": 10443}}"#);
    let responses = engine_with_response_rule();
    assert_eq!(responses.decide(&response).decision, Decision::Allow);
    // and response rules can read the port too.
    let on_port = engine(
        r#"
[security.rules.http.not_on_10443]
on = "http.response"
if = 'http.request.port == 10443'
decision = "block"
"#,
    );
    assert_eq!(on_port.decide(&response).rule.as_deref(), Some("http.not_on_10443"));
    // explain says why the host rule did not apply.
    let explained = hosts.explain(&at("x.com", 10443)).to_string();
    assert!(explained.contains("does not name http.request.port"), "{explained}");
    assert!(explained.contains("x.com:10443"), "{explained}");
}

fn engine_with_response_rule() -> Engine {
    engine(
        r#"
[security.rules.http.x_responses]
on = "http.response"
if = 'http.request.host == "x.com"'
decision = "allow"
"#,
    )
}

#[test]
fn port_is_an_int_field_of_http_events() {
    let error = layered(&[(Layer::User, "p.toml", &rule("bad", "allow", 10, Some(r#"http.request.port == "443""#)))])
        .unwrap_err()
        .to_string();
    assert!(error.contains("p.toml"), "{error}");
    assert!(error.contains("int"), "{error}");
    let error = layered(&[(
        Layer::User,
        "p.toml",
        "[security.rules.dns.bad]\non = \"dns.request\"\nif = 'http.request.port == 443'\ndecision = \"allow\"\n",
    )])
    .unwrap_err()
    .to_string();
    assert!(error.contains("not available in `dns.request` rules"), "{error}");
}

#[test]
fn uncommon_record_types_need_a_rule_naming_the_type() {
    let dns = engine(
        r#"
[security.rules.dns.x]
on = "dns.request"
if = 'dns.request.qname.endsWith("x.com")'
decision = "allow"

[security.rules.dns.x_caa]
on = "dns.request"
if = 'dns.request.qname == "ca.x.com" && dns.request.qtype == "CAA"'
decision = "allow"
"#,
    );
    let query = |qname: &str, qtype: &str| {
        let verdict =
            dns.decide(&event(&format!(r#"{{"event": "dns.request", "qname": "{qname}", "qtype": "{qtype}"}}"#)));
        (verdict.decision, verdict.rule)
    };
    for qtype in ["A", "AAAA", "CNAME", "HTTPS", "MX", "SRV", "TXT"] {
        assert_eq!(query("a.x.com", qtype), (Decision::Allow, Some("dns.x".into())), "{qtype}");
    }
    for qtype in ["NULL", "ANY", "CAA", "TYPE65280", "PTR"] {
        assert_eq!(query("a.x.com", qtype), (Decision::Block, None), "{qtype}");
    }
    assert_eq!(query("ca.x.com", "CAA"), (Decision::Allow, Some("dns.x_caa".into())));
}

#[test]
fn dns_limits_come_from_profiles_and_only_tighten() {
    use policy::DnsLimits;
    let defaults = DnsLimits::default();
    assert_eq!(engine("").dns_limits(), defaults);
    let corporate = "[security.limits.dns]\nqueries_per_second = 20\nmax_labels = 8\n";
    let user = "[security.limits.dns]\nqueries_per_second = 1000\nblocked_burst = 10\n";
    let both = layered(&[(Layer::Corporate, "corp.toml", corporate), (Layer::User, "user.toml", user)]).unwrap();
    let limits = both.dns_limits();
    assert_eq!(limits.queries_per_second, 20, "the user cannot loosen it");
    assert_eq!(limits.max_labels, 8);
    assert_eq!(limits.blocked_burst, 10, "but can tighten");
    assert_eq!(limits.queries_burst, defaults.queries_burst);
    // A key only one profile gives is that profile's, above the default too.
    let generous =
        layered(&[(Layer::Corporate, "corp.toml", "[security.limits.dns]\nqueries_per_second = 500\n")]).unwrap();
    assert_eq!(generous.dns_limits().queries_per_second, 500);

    for (profile, expected) in [
        (
            "[security.limits.dns]\nmax_name_length = 300\n",
            "p.toml:2:19: `max_name_length` = 300 is out of range (1 to 253)",
        ),
        ("[security.limits.dns]\nqueries_per_second = 0\n", "p.toml:2:22: `queries_per_second` = 0 is out of range"),
        ("[security.limits.dns]\nqueries_per_minute = 5\n", "unknown field `queries_per_minute`"),
        ("[security.limits.tcp]\n", "unknown field `tcp`"),
    ] {
        let error = layered(&[(Layer::User, "p.toml", profile)]).unwrap_err().to_string();
        assert!(error.contains(expected), "{profile}: {error}");
    }
}

#[test]
fn tcp_connect_rules_carry_a_mode_and_name_ports_and_literal_addresses() {
    use policy::ConnectMode;
    let tcp = engine(
        r#"
[security.rules.tcp.git_ssh]
on = "tcp.connect"
if = 'tcp.connect.host == "github.com" && tcp.connect.port == 22'
decision = "allow"
mode = "tcp"

[security.rules.tcp.pinned]
on = "tcp.connect"
if = 'tcp.connect.host == "pinned.example"'
decision = "allow"
mode = "passthrough"

[security.rules.tcp.any_github_port]
on = "tcp.connect"
if = 'tcp.connect.host == "api.github.com"'
decision = "allow"

[security.rules.tcp.lan]
on = "tcp.connect"
if = 'tcp.connect.ip.startsWith("10.7.") && tcp.connect.port == 5432'
decision = "allow"
mode = "tcp"

[security.rules.tcp.ollama]
on = "tcp.connect"
if = 'tcp.connect.host == "models.internal" && tcp.connect.port == 11434'
decision = "ask"
mode = "http"
"#,
    );
    let decide = |json: &str| {
        let verdict = tcp.decide(&event(json));
        (verdict.decision, verdict.rule, verdict.mode)
    };
    let allowed = |rule: &str, mode| (Decision::Allow, Some(rule.to_owned()), Some(mode));
    assert_eq!(
        decide(r#"{"event":"tcp.connect","host":"github.com","ip":"140.82.1.1","port":22}"#),
        allowed("tcp.git_ssh", ConnectMode::Tcp)
    );
    assert_eq!(
        decide(r#"{"event":"tcp.connect","host":"pinned.example","port":443}"#),
        allowed("tcp.pinned", ConnectMode::Passthrough)
    );
    // No mode: inspect. A rule that does not name the port allows 443 only.
    assert_eq!(
        decide(r#"{"event":"tcp.connect","host":"api.github.com","port":443}"#),
        allowed("tcp.any_github_port", ConnectMode::Inspect)
    );
    assert_eq!(decide(r#"{"event":"tcp.connect","host":"api.github.com","port":8443}"#), (Decision::Block, None, None));
    // A literal address (no host) needs a rule that names tcp.connect.ip.
    assert_eq!(decide(r#"{"event":"tcp.connect","ip":"10.7.0.5","port":5432}"#), allowed("tcp.lan", ConnectMode::Tcp));
    assert_eq!(decide(r#"{"event":"tcp.connect","ip":"140.82.1.1","port":22}"#), (Decision::Block, None, None));
    // Ask carries its mode.
    assert_eq!(
        decide(r#"{"event":"tcp.connect","host":"models.internal","port":11434}"#),
        (Decision::Ask, Some("tcp.ollama".into()), Some(ConnectMode::Http))
    );
    let explained =
        tcp.explain(&event(r#"{"event":"tcp.connect","host":"github.com","ip":"140.82.1.1","port":22}"#)).to_string();
    assert!(explained.contains("mode: tcp"), "{explained}");
    let explained = tcp.explain(&event(r#"{"event":"tcp.connect","ip":"140.82.1.1","port":22}"#)).to_string();
    assert!(
        explained.contains("140.82.1.1:22 (no DNS name)") && explained.contains("names tcp.connect.port"),
        "{explained}"
    );

    for (profile, expected) in [
        (
            "[security.rules.http.x]\non = \"http.request\"\ndecision = \"allow\"\nmode = \"tcp\"\n",
            "p.toml:4:9: `mode` applies to `tcp.connect` rules only",
        ),
        (
            "[security.rules.tcp.x]\non = \"tcp.connect\"\ndecision = \"block\"\nmode = \"tcp\"\n",
            "p.toml:4:9: `mode` needs `decision = \"allow\"` or `\"ask\"`",
        ),
        (
            "[security.rules.tcp.x]\non = \"tcp.connect\"\ndecision = \"allow\"\nmode = \"udp\"\n",
            "p.toml:4:9: unknown mode `udp` (modes: inspect, passthrough, tcp, http)",
        ),
    ] {
        let error = layered(&[(Layer::User, "p.toml", profile)]).unwrap_err().to_string();
        assert!(error.contains(expected), "{profile}: {error}");
    }
}
