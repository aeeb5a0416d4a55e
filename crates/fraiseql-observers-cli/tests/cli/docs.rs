//! The README documents every command: each subcommand the binary's `--help` lists, at every
//! level (`capture disable`), is named in it.

use crate::harness::BIN;

const README: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"));

/// The subcommands `--help` lists under "Commands:" for `path` (`help` left out).
fn subcommands(path: &[String]) -> Vec<String> {
    let out = std::process::Command::new(BIN)
        .args(path)
        .arg("--help")
        .output()
        .expect("run the binary");
    assert!(out.status.success(), "{path:?} --help failed");
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some(commands) = help.split("Commands:\n").nth(1) else {
        return Vec::new();
    };
    commands
        .lines()
        .take_while(|l| l.starts_with("  "))
        // A command's line is indented by two; a wrapped description, by more.
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Every command path, depth first: `["capture"]`, `["capture", "enable"]`, ...
fn command_paths(prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    for name in subcommands(&prefix) {
        let mut path = prefix.clone();
        path.push(name);
        out.push(path.clone());
        command_paths(path, out);
    }
}

#[test]
fn every_subcommand_is_in_the_readme() {
    let mut paths = Vec::new();
    command_paths(Vec::new(), &mut paths);
    assert!(paths.len() >= 10, "{paths:?}");
    let missing: Vec<String> = paths
        .iter()
        .map(|p| p.join(" "))
        .filter(|command| {
            // Written as `fraiseql-observers capture disable ...`, or as `capture disable` in
            // backticks (the README's command table).
            !README.contains(&format!("fraiseql-observers {command}"))
                && !README.contains(&format!("`{command}"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "commands missing from README.md: {missing:?}"
    );
}
