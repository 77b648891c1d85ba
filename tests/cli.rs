//! The command-line tool, run as a user would: the built binary on the
//! shipped examples and manifests, on broken configurations, and on the
//! keys it makes itself.
#![cfg(not(target_arch = "wasm32"))]
// A test crate: failing loudly is the point.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_azure-openai-filter");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the tool with only `env` in its environment.
fn run(args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> (i32, String, String) {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .current_dir(root())
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("run the tool");
    {
        let mut pipe = child.stdin.take().expect("stdin");
        if let Some(bytes) = stdin {
            pipe.write_all(bytes).expect("write stdin");
        }
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("wait");
    (
        status.code().expect("exit code"),
        String::from_utf8(stdout).expect("utf-8 stdout"),
        String::from_utf8(stderr).expect("utf-8 stderr"),
    )
}

const EXAMPLE_ENV: &[(&str, &str)] = &[
    ("AZURE_DEMO_KEY", "demo-upstream-key"),
    ("AZURE_WEST_KEY", "west-key"),
    ("AZURE_PTU_KEY", "ptu-key"),
    ("AZURE_EAST_KEY", "east-key"),
    ("AZURE_CLIENT_SECRET", "client-secret"),
    ("VLLM_TOKEN", "vllm-token"),
];

fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn visit(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                visit(&path, ext, out);
            } else if path.extension().is_some_and(|e| e == ext) {
                out.push(path);
            }
        }
    }
    visit(&root().join(dir), ext, &mut out);
    out.sort();
    out
}

#[test]
fn every_shipped_example_is_accepted_and_described() {
    // envoy/ratelimit/ holds rate-limit services' own files, not Envoy's.
    let not_envoy = root().join("envoy").join("ratelimit");
    let examples: Vec<PathBuf> = files("envoy", "yaml")
        .into_iter()
        .filter(|path| !path.starts_with(&not_envoy))
        .collect();
    assert!(examples.len() >= 4, "{examples:?}");
    for example in examples {
        let path = example.to_str().expect("path");
        let (code, out, err) = run(&["check", path], EXAMPLE_ENV, None);
        assert_eq!(code, 0, "{path}\n{out}\n{err}");
        assert!(out.contains("configuration accepted"), "{out}");
        assert!(out.contains("callers (name: models):"), "{out}");
    }
}

#[test]
fn the_production_example_routes_as_documented() {
    let (code, out, _) = run(&["check", "envoy/production.yaml"], EXAMPLE_ENV, None);
    assert_eq!(code, 0, "{out}");
    for line in [
        "env AZURE_WEST_KEY: set",
        "west: Azure OpenAI (deployments API) at acme-west.openai.azure.com, Envoy cluster `azure_west`",
        "responses 2025-04-01-preview",
        "gpt-4o -> west, gpt4o-prod: POST /openai/deployments/gpt4o-prod/{operation}?api-version={per operation}",
        "gpt-4o-mini -> east, gpt4o-mini-prod: POST /openai/v1/{operation} with body model `gpt4o-mini-prod`",
        "team-a: gpt-4o, gpt-4o-mini",
        "ops: every model",
        "stored responses (/v1/responses/{id}): west",
    ] {
        assert!(out.contains(line), "missing `{line}` in\n{out}");
    }
}

#[test]
fn every_shipped_manifest_is_accepted_without_the_cluster_secrets() {
    let manifests = files("deploy", "yaml");
    assert!(manifests.len() >= 2, "{manifests:?}");
    let mut checked = 0;
    for manifest in manifests {
        let path = manifest.to_str().expect("path");
        let text = std::fs::read_to_string(&manifest).expect("read");
        if !text.contains("azure_openai") {
            continue; // a manifest without the filter (a Secret, a ConfigMap)
        }
        let (code, out, err) = run(&["check", "--allow-missing-env", path], &[], None);
        assert_eq!(code, 0, "{path}\n{out}\n{err}");
        assert!(out.contains("configuration accepted"), "{out}");
        assert!(out.contains("allowed by --allow-missing-env"), "{out}");
        // Without the flag the same manifest is refused: the secrets are not here.
        let (code, out, _) = run(&["check", path], &[], None);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("not set in this environment"), "{out}");
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} manifests hold the filter");
}

fn write_temp(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aoaf-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

fn config_json(callers: &str) -> String {
    format!(
        r#"{{
  "upstreams": {{"west": {{"endpoint": "acme-west", "cluster": "azure_west",
                          "auth": {{"api_key": {{"env": "AZURE_WEST_KEY"}}}}}}}},
  "models": {{"gpt-4o": {{"upstream": "west", "deployment": "gpt4o-prod"}}}},
  "callers": [{callers}]
}}"#
    )
}

const A_HASH: &str = "50a734ef22b610c7ad5e602d7a1aa5e39a9a39a6f6cc38aa2415f9d58b52146e";

#[test]
fn a_refused_configuration_names_the_field_as_the_filter_does() {
    let bad = config_json(&format!(
        r#"{{"name": "a", "key_sha256": "{A_HASH}", "models": ["gpt-5"]}}"#
    ));
    let path = write_temp("bad.json", &bad);
    let (code, out, _) = run(
        &["check", path.to_str().expect("path")],
        &[("AZURE_WEST_KEY", "k")],
        None,
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("configuration refused: callers[0].models[0]: unknown model alias `gpt-5`"),
        "{out}"
    );
    let broken = write_temp("broken.json", "{upstreams: nope}");
    let (code, out, _) = run(&["check", broken.to_str().expect("path")], &[], None);
    assert_eq!(code, 1);
    assert!(
        out.contains("configuration refused: configuration: key must be a string"),
        "{out}"
    );
}

#[test]
fn secrets_must_be_visible_to_the_filter_and_set() {
    // A bare JSON file reads this shell's environment.
    let good = config_json(&format!(
        r#"{{"name": "a", "key_sha256": "{A_HASH}", "models": ["*"]}}"#
    ));
    let path = write_temp("good.json", &good);
    let path = path.to_str().expect("path");
    let (code, out, _) = run(&["check", path], &[], None);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("env AZURE_WEST_KEY: not set in this environment"),
        "{out}"
    );
    assert!(
        out.contains(
            "upstreams.west.auth.api_key.env: environment variable `AZURE_WEST_KEY` is not visible"
        ),
        "{out}"
    );
    let (code, out, _) = run(&["check", path], &[("AZURE_WEST_KEY", "k")], None);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = run(&["check", path], &[("AZURE_WEST_KEY", "")], None);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("environment variable `AZURE_WEST_KEY` is empty"),
        "{out}"
    );

    // In a bootstrap, only what vm_config lists reaches the filter: set in
    // the shell is not enough, and --allow-missing-env does not excuse it.
    let production = std::fs::read_to_string(root().join("envoy/production.yaml")).expect("read");
    let unlisted = production.replace(
        "host_env_keys: [AZURE_WEST_KEY, AZURE_EAST_KEY, VLLM_TOKEN]",
        "host_env_keys: [AZURE_EAST_KEY, VLLM_TOKEN]",
    );
    assert_ne!(unlisted, production);
    let path = write_temp("unlisted.yaml", &unlisted);
    for flags in [&["check"][..], &["check", "--allow-missing-env"][..]] {
        let mut args = flags.to_vec();
        args.push(path.to_str().expect("path"));
        let (code, out, _) = run(&args, EXAMPLE_ENV, None);
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains("env AZURE_WEST_KEY: not visible to the filter: list it in vm_config.environment_variables.host_env_keys"),
            "{out}"
        );
    }
}

fn new_key(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["new-key", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = run(&all, &[], None);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).expect("new-key --json prints JSON")
}

#[test]
fn new_key_and_hash_key_agree() {
    let made = new_key(&[]);
    let key = made["key"].as_str().expect("key");
    assert!(key.starts_with("sk-") && key.len() >= 3 + 43, "{key}");
    let hash = made["key_sha256"].as_str().expect("hash");
    assert_eq!(made["caller"]["key_sha256"], hash);
    assert_eq!(made["caller"]["models"], serde_json::json!(["*"]));
    for input in [format!("{key}\n"), key.to_string(), format!("{key}\r\n")] {
        let (code, out, err) = run(&["hash-key"], &[], Some(input.as_bytes()));
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.trim_end(), hash);
    }
    assert_ne!(new_key(&[])["key"], made["key"]);

    // The plain output shows the same three things.
    let (code, out, err) = run(&["new-key", "--name", "team-x"], &[], None);
    assert_eq!(code, 0);
    assert!(out.contains("key:        sk-"), "{out}");
    assert!(out.contains(r#""name":"team-x""#), "{out}");
    assert!(err.contains("every model"), "{err}");
}

#[test]
fn hash_key_refuses_what_could_never_match() {
    for input in [
        &b""[..],
        b"\n",
        b"sk-x\n\n",
        b" sk-x",
        b"sk-x \n",
        b"a\x07b",
    ] {
        let (code, _, err) = run(&["hash-key"], &[], Some(input));
        assert_eq!(code, 1, "{input:?}: {err}");
    }
    let (code, out, _) = run(&["hash-key"], &[], Some(b"sk-demo-team-a\n"));
    assert_eq!((code, out.trim_end()), (0, A_HASH));
}

#[test]
fn a_new_key_entry_is_accepted_by_check() {
    let made = new_key(&["--name", "team-x", "--models", "gpt-4o"]);
    let config = config_json(&made["caller"].to_string());
    let path = write_temp("new-key.json", &config);
    let (code, out, _) = run(
        &["check", path.to_str().expect("path")],
        &[("AZURE_WEST_KEY", "k")],
        None,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("team-x: gpt-4o"), "{out}");
    // Two keys made separately never collide in one configuration.
    let other = new_key(&["--models", "gpt-4o"]);
    let config = config_json(&format!("{},{}", made["caller"], other["caller"]));
    let path = write_temp("two-keys.json", &config);
    let (code, out, _) = run(
        &["check", path.to_str().expect("path")],
        &[("AZURE_WEST_KEY", "k")],
        None,
    );
    assert_eq!(code, 0, "{out}");
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &[][..],
        &["frobnicate"][..],
        &["check"][..],
        &["check", "a", "b"][..],
        &["check", "--nope", "x"][..],
        &["check", "/does/not/exist.yaml"][..],
        &["hash-key", "sk-on-the-command-line"][..],
        &["new-key", "--name"][..],
        &["new-key", "--models", ","][..],
    ] {
        let (code, _, err) = run(args, &[], Some(b""));
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("azure-openai-filter"), "{err}");
    }
    let (code, out, _) = run(&["--help"], &[], None);
    assert_eq!(code, 0);
    assert!(out.contains("check [--allow-missing-env] CONFIG"));
}

#[test]
fn the_pools_example_shows_each_target() {
    let (code, out, _) = run(&["check", "envoy/pools.yaml"], EXAMPLE_ENV, None);
    assert_eq!(code, 0, "{out}");
    for line in [
        "gpt-4o -> west-ptu, gpt4o-ptu: POST /openai/deployments/gpt4o-ptu/{operation}?api-version={per operation} [priority 0, weight 1] [spillover to gpt4o-standard]",
        "       -> west, gpt4o: POST /openai/deployments/gpt4o/{operation}?api-version={per operation} [priority 1, weight 3]",
        "       -> east, gpt4o: POST /openai/deployments/gpt4o/{operation}?api-version={per operation} [priority 1, weight 1]",
    ] {
        assert!(out.contains(line), "missing {line:?} in\n{out}");
    }
}
