//! Hostile profiles: conditions as deep or as long as their size allows are
//! rejected at load, never crash the loader; what is accepted can be
//! evaluated on a small (2 MiB) stack, as on a tokio worker thread.

use policy::{Decision, Engine, Event, Layer, ProfileSource};

fn load(condition: &str) -> Result<Engine, String> {
    let text = format!(
        "[security.rules.http.a]\non = \"http.request\"\nif = '{condition}'\ndecision = \"block\"\npriority = 1\n\n\
         [security.rules.http.otherwise]\non = \"http.request\"\ndecision = \"allow\"\n"
    );
    Engine::load_layers(&[(Layer::User, ProfileSource::Text { name: "p.toml".into(), text })])
        .map_err(|e| e.to_string())
}

#[test]
fn deep_conditions_are_rejected_at_load() {
    for (condition, expected) in [
        (format!("size(http.request.path) {} == 1", "+ 1 ".repeat(1600)), "the condition nests deeper than 24 levels"),
        (format!("size(http.request.path) {} == 1", "+ 1 ".repeat(22)), "the condition nests deeper than 24 levels"),
        (format!("has(dyn(http.request.headers){})", ".a".repeat(3000)), "the condition nests deeper than 24 levels"),
        (
            format!("dyn(http.request.headers){} == \"x\"", "[\"a\"]".repeat(1300)),
            "the condition nests deeper than 24 levels",
        ),
        (
            format!("{}true{}", "(".repeat(3000), ")".repeat(3000)),
            "p.toml:3:7: the condition nests deeper than the parser allows",
        ),
        (
            format!("{}1{} == [1]", "[".repeat(3000), "]".repeat(3000)),
            "p.toml:3:7: the condition nests deeper than the parser allows",
        ),
        (vec!["http.request.host == \"x\""; 400].join(" || "), "p.toml:3:7: the condition is longer than 8192 bytes"),
    ] {
        let error = load(&condition).unwrap_err();
        assert!(error.contains(expected), "{error}");
    }
}

#[test]
fn accepted_conditions_evaluate_on_small_stacks() {
    let event = Event::from_json(r#"{"event": "http.request", "host": "x", "path": "/"}"#).unwrap();
    for (condition, expected) in [
        // 20 additions: at the depth limit, all in the CEL interpreter
        (format!("size(http.request.path) {} == 21", "+ 1 ".repeat(20)), Decision::Block),
        (format!("{}true", "!".repeat(6000)), Decision::Block),
        (vec!["http.request.host == \"y\""; 250].join(" || "), Decision::Allow),
        (vec!["http.request.host == \"x\""; 250].join(" && "), Decision::Block),
    ] {
        let engine = load(&condition).unwrap_or_else(|error| panic!("{error}"));
        let event = event.clone();
        let verdict = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || engine.decide(&event))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(verdict.decision, expected, "{}", &condition[..40]);
    }
}
