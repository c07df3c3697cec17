//! `deploy/prometheus/trellis.rules.yml` against the stage-trigger constants, the runbooks and
//! its own unit tests. (`promtool check rules` and `promtool test rules` run in `cargo xtask test`.)

use std::collections::BTreeMap;
use std::time::Duration;

use serde_yaml_ng::Value;
use trellis_domain::stage::TRIGGERS;

use crate::harness::{repo_root, yaml};

const RULES: &str = "deploy/prometheus/trellis.rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/trellis.rules.test.yml";

struct Rule {
    expr: String,
    for_: Option<Duration>,
    runbook: Option<String>,
}

fn text(v: &Value) -> Option<String> {
    v.as_str().map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// (recording rules, alerts) by name.
fn rules() -> (BTreeMap<String, Rule>, BTreeMap<String, Rule>) {
    let (mut records, mut alerts) = (BTreeMap::new(), BTreeMap::new());
    let doc = yaml(RULES);
    for group in doc["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let parsed = Rule {
                expr: text(&rule["expr"]).expect("every rule has an expr"),
                for_: rule["for"].as_str().map(|f| humantime::parse_duration(f).expect("a `for` duration")),
                runbook: rule["annotations"]["runbook_url"].as_str().map(str::to_owned),
            };
            match (rule["record"].as_str(), rule["alert"].as_str()) {
                (Some(name), None) => assert!(records.insert(name.to_owned(), parsed).is_none(), "{name} twice"),
                (None, Some(name)) => assert!(alerts.insert(name.to_owned(), parsed).is_none(), "{name} twice"),
                _ => panic!("a rule is either a record or an alert: {rule:?}"),
            }
        }
    }
    (records, alerts)
}

#[test]
fn every_stage_trigger_is_an_alert_on_its_recording_rule_with_the_domain_threshold() {
    let (records, alerts) = rules();
    for trigger in TRIGGERS {
        assert!(records.contains_key(trigger.record), "{RULES} has no recording rule {}", trigger.record);
        let alert = alerts.get(trigger.alert).unwrap_or_else(|| panic!("{RULES} has no alert {}", trigger.alert));
        assert_eq!(alert.expr, format!("{} > {}", trigger.record, trigger.threshold), "{}", trigger.alert);
        assert_eq!(alert.for_, trigger.sustained_for.map(Duration::from_secs), "`for` of {}", trigger.alert);
    }
    let stage_alerts: Vec<&String> = alerts.keys().filter(|a| a.starts_with("StageTrigger")).collect();
    for alert in stage_alerts {
        assert!(TRIGGERS.iter().any(|t| t.alert == alert), "{alert} is not in trellis_domain::stage::TRIGGERS");
    }
}

#[test]
fn every_alert_links_a_runbook_that_exists() {
    let (_, alerts) = rules();
    for (name, alert) in &alerts {
        let runbook = alert.runbook.as_deref().unwrap_or_else(|| panic!("{name} has no runbook_url"));
        assert!(repo_root().join(runbook).is_file(), "{name}: runbook {runbook} does not exist");
    }
}

#[test]
fn every_alert_has_a_unit_test_where_it_fires_and_one_where_it_stays_silent() {
    let (_, alerts) = rules();
    let doc = yaml(RULE_TESTS);
    let mut fires = BTreeMap::<String, bool>::new();
    let mut silent = BTreeMap::<String, bool>::new();
    for test in doc["tests"].as_sequence().expect("tests") {
        for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_owned();
            let expected = case["exp_alerts"].as_sequence().map_or(0, Vec::len);
            if expected > 0 {
                fires.insert(name, true);
            } else {
                silent.insert(name, true);
            }
        }
    }
    for name in alerts.keys() {
        assert!(fires.contains_key(name), "{RULE_TESTS} never expects {name} to fire");
        assert!(silent.contains_key(name), "{RULE_TESTS} never expects {name} to stay silent");
    }
}
