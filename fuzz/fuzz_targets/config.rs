//! The config loader: any text gives a config or a list of errors, never a
//! panic; a config that validates compiles into a snapshot, and its YAML
//! rendering loads back to the same config.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrigger::config::Config;
use outrigger::snapshot::Snapshot;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_yaml(text) {
        Ok(config) => {
            let again = Config::from_yaml(&config.to_yaml()).expect("a valid config renders to a valid config");
            assert_eq!(again, config, "the YAML rendering round-trips");
            let _ = Snapshot::build(config, 1, None);
        }
        Err(errors) => assert!(!errors.0.is_empty(), "an error list is never empty"),
    }
});
