//! `azure-openai-filter`: the operator's command-line tool.
//!
//! It links the filter's own configuration module (the crate's rlib), so
//! `check` accepts and refuses exactly what the filter does at load.
//!
//! ```text
//! azure-openai-filter check [--allow-missing-env] CONFIG
//! azure-openai-filter new-key [--name NAME] [--models A,B] [--json]
//! azure-openai-filter hash-key < KEY
//! ```
//!
//! Exit codes: 0 ok, 1 refused (a configuration, or a key that can never
//! match), 2 usage error. Native only: on wasm32 there is nothing to run.

#[cfg(not(target_arch = "wasm32"))]
mod check;
#[cfg(not(target_arch = "wasm32"))]
mod keys;
#[cfg(not(target_arch = "wasm32"))]
mod source;

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(run(&args));
}

#[cfg(target_arch = "wasm32")]
fn main() {}

/// Everything went as asked.
#[cfg(not(target_arch = "wasm32"))]
const OK: i32 = 0;
/// The configuration (or key) was refused.
#[cfg(not(target_arch = "wasm32"))]
const REFUSED: i32 = 1;
/// The command line was wrong.
#[cfg(not(target_arch = "wasm32"))]
const USAGE: i32 = 2;

#[cfg(not(target_arch = "wasm32"))]
const HELP: &str = "\
azure-openai-filter: check a configuration, make and hash caller keys

Usage:
  azure-openai-filter check [--allow-missing-env] CONFIG
      Validates CONFIG exactly as the filter does at load and prints what it
      would route. CONFIG is the filter's JSON, or an Envoy bootstrap or
      Kubernetes manifests (YAML or JSON, several documents allowed) holding
      the filter: a Wasm filter whose configuration is a
      google.protobuf.StringValue (Envoy, Istio EnvoyFilter, Envoy Gateway
      EnvoyPatchPolicy) or an Envoy Gateway EnvoyExtensionPolicy. Every
      {\"env\": NAME} secret must be visible to the filter (listed in
      vm_config.environment_variables) and set in this environment;
      --allow-missing-env reports unset ones without refusing (for checking
      manifests whose secrets live in the cluster).
  azure-openai-filter new-key [--name NAME] [--models A,B] [--json]
      Makes a random caller key (sk- and 32 bytes from the OS, base64url),
      printed once with its key_sha256 and a callers[] entry.
  azure-openai-filter hash-key
      Reads a key on standard input (one trailing newline is dropped) and
      prints its key_sha256.

Exit codes: 0 ok, 1 refused, 2 usage error.
";

#[cfg(not(target_arch = "wasm32"))]
fn run(args: &[String]) -> i32 {
    let Some((command, rest)) = args.split_first() else {
        eprint!("{HELP}");
        return USAGE;
    };
    match command.as_str() {
        "check" => check::main(rest),
        "new-key" => keys::new_key_main(rest),
        "hash-key" => keys::hash_key_main(rest),
        "help" | "--help" | "-h" => {
            print!("{HELP}");
            OK
        }
        "--version" | "-V" => {
            println!("azure-openai-filter {}", env!("CARGO_PKG_VERSION"));
            OK
        }
        other => usage(&format!("unknown command `{other}`")),
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn usage(message: &str) -> i32 {
    eprintln!("azure-openai-filter: {message}");
    eprintln!("Run `azure-openai-filter --help` for usage.");
    USAGE
}
