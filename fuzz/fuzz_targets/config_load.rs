//! Config loading (`herald_core::config::Config::load(text, env)`): the TOML
//! file and the `HERALD_*` environment overrides. Input: the file text, a
//! NUL byte, then `NAME=value` lines for the environment. A config that
//! loads must also load again from its own serialisation, to the same
//! config (what an operator sees in a dump is what runs).
#![no_main]

use std::collections::BTreeMap;

use herald_core::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(data) = std::str::from_utf8(data) else { return };
    let (text, env_text) = data.split_once('\0').unwrap_or((data, ""));
    let env: BTreeMap<String, String> =
        env_text.lines().filter_map(|line| line.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let Ok(config) = Config::load(text, &env) else { return };
    let dumped = toml::to_string(&config).expect("a loaded config serialises");
    let again = Config::load(&dumped, &BTreeMap::new())
        .unwrap_or_else(|e| panic!("a loaded config does not load from its dump: {e}\n{dumped}"));
    assert_eq!(toml::to_string(&again).unwrap(), dumped);
});
