//! Write commands, `[[cache.commands]]` (issue 16, cache models): SQL that
//! changes the database, run by the cache API's `Write` with caller
//! parameters `$1…$n` and the tenant bound by Herald, and the tags of the
//! cache entries it changes.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::TableConfig;
use super::cache::{ResourceConfig, check_row_tag};
use crate::keys::validate_identifier;

/// How a command reaches the database and the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WriteModel {
    /// The call commits, invalidates the command's tags, and returns once
    /// every live cache node has applied every change up to the commit (or
    /// `cache.write_wait_ms` passed; the answer says which).
    #[default]
    WriteThrough,
}

/// A configured write command.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    pub name: String,
    /// The statement. Caller parameters are `$1…$n`; the tenant is
    /// `$tenant`, bound by Herald (never by the caller), and required.
    pub sql: String,
    /// Names of `$1…$n`, in order (HTTP passes them by name).
    #[serde(default)]
    pub params: Vec<String>,
    /// Tag templates (`$k` is parameter k) of the entries the command
    /// changes: dropped right after the commit, on every node.
    pub tags: Vec<String>,
    #[serde(default)]
    pub model: WriteModel,
}

/// Checks the commands against the watched `tables`; errors name the key.
pub(crate) fn validate(commands: &[CommandConfig], tables: &[TableConfig]) -> Result<(), String> {
    let mut names = HashSet::new();
    for (i, c) in commands.iter().enumerate() {
        let at = |field: &str| format!("cache.commands[{i}] ({}).{field}", c.name);
        validate_identifier(&c.name).map_err(|e| format!("{}: {e}", at("name")))?;
        if !names.insert(c.name.as_str()) {
            return Err(format!("{}: duplicate command name", at("name")));
        }
        for p in &c.params {
            validate_identifier(p).map_err(|e| format!("{}: {e}", at("params")))?;
        }
        let used: HashSet<usize> = ResourceConfig::placeholders(&c.sql).into_iter().collect();
        let n = c.params.len();
        if let Some(k) = used.iter().find(|k| **k == 0 || **k > n) {
            return Err(format!("{}: uses ${k} but the command has {n} params", at("sql")));
        }
        if let Some(k) = (1..=n).find(|k| !used.contains(k)) {
            return Err(format!("{}: never uses ${k} ({})", at("sql"), c.params[k - 1]));
        }
        if !c.sql.contains("$tenant") {
            return Err(format!(
                "{}: must filter by $tenant (Herald binds it), so a caller writes only its own tenant's rows",
                at("sql")
            ));
        }
        if c.tags.is_empty() {
            return Err(format!("{}: name the tags of the entries the command changes", at("tags")));
        }
        for tag in &c.tags {
            if let Some(k) = ResourceConfig::placeholders(tag).into_iter().find(|k| *k == 0 || *k > n) {
                return Err(format!("{}: {tag:?} uses ${k} but the command has {n} params", at("tags")));
            }
            if !ResourceConfig::column_refs(tag).is_empty() {
                return Err(format!("{}: {tag:?}: a command has no result columns; use $k", at("tags")));
            }
            check_row_tag(tag, false, tables).map_err(|reason| format!("{}: {reason}", at("tags")))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::config::Config;

    const TABLE: &str =
        "[[tables]]\nname = \"res_users\"\nkey_columns = [\"website_slug\"]\ntenant_column = \"tenant_id\"\n";

    fn load(command: &str) -> Result<Config, String> {
        let text = format!("{TABLE}[[cache.commands]]\nname = \"rename\"\n{command}");
        Config::load(&text, &BTreeMap::new()).map_err(|e| e.to_string())
    }

    #[test]
    fn commands_are_checked_and_errors_name_the_key() {
        let ok = "sql = \"UPDATE res_users SET name = $2 WHERE tenant_id = $tenant AND id = $1\"\n\
                  params = [\"id\", \"name\"]\ntags = [\"res_users.id=$1\"]\n";
        let config = load(ok).unwrap();
        assert_eq!(config.cache.commands[0].model, super::WriteModel::WriteThrough);
        load(&format!("{ok}model = \"write-through\"\n")).unwrap();
        let cases = [
            (ok.replace("$2 WHERE", "$3 WHERE"), "uses $3 but the command has 2 params"),
            (ok.replace("[\"id\", \"name\"]", "[\"id\", \"name\", \"x\"]"), "never uses $3"),
            (ok.replace("tenant_id = $tenant AND ", ""), "must filter by $tenant"),
            (ok.replace("[\"res_users.id=$1\"]", "[]"), "name the tags"),
            (ok.replace("res_users.id=$1", "res_users.id=$4"), "uses $4"),
            (ok.replace("res_users.id=$1", "res_users.id={id}"), "no result columns"),
            (ok.replace("res_users.id=$1", "res_users.name=$1"), "neither the id column nor a key column"),
            (ok.replace("[\"id\", \"name\"]", "[\"id\", \"a b\"]"), "params"),
        ];
        for (text, expected) in cases {
            let err = load(&text).unwrap_err();
            assert!(err.contains("rename") && err.contains(expected), "{expected}: {err}");
        }
        // An unknown model is a TOML error at its line, naming the variants.
        let err = load(&format!("{ok}model = \"sometimes\"\n")).unwrap_err();
        assert!(err.contains("write-through"), "{err}");
        let twice = format!("{ok}[[cache.commands]]\nname = \"rename\"\n{ok}");
        assert!(load(&twice).unwrap_err().contains("duplicate command name"));
    }
}
