//! Write commands, `[[cache.commands]]` (issue 16, cache models): SQL that
//! changes the database, run by the cache API's `Write` with caller
//! parameters `$1…$n` and the tenant bound by Herald, and the tags of the
//! cache entries it changes.
//!
//! A write-behind command also names its *overlay*: how its parameters map
//! to the value readers see before Postgres has it (`[cache.commands.overlay]`:
//! which resource, which of its entries, which JSON fields of that entry's
//! row get which parameter).

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::TableConfig;
use super::cache::{ResourceConfig, Shape, check_row_tag};
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
    /// The call returns once the command is durable in the tenant's Redis
    /// command stream; readers see its overlay (marked pending) at once; a
    /// writer applies it to Postgres exactly once, in order.
    WriteBehind,
}

/// What readers of a resource see of a write-behind command before
/// Postgres has it: the fields `set` patched into the row of `resource`
/// named by `params`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlayConfig {
    /// A `[[cache.resources]]` name of shape `row`.
    pub resource: String,
    /// Every parameter of the resource → `$k` of the command.
    pub params: BTreeMap<String, String>,
    /// JSON field of the row → `$k` of the command.
    pub set: BTreeMap<String, String>,
}

impl OverlayConfig {
    /// The command parameter index (0-based) of a `$k` reference.
    pub fn param_index(reference: &str) -> Option<usize> {
        let k: usize = reference.strip_prefix('$')?.parse().ok()?;
        k.checked_sub(1)
    }
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
    /// Required with `model = "write-behind"`, refused otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<OverlayConfig>,
}

/// Checks the commands against the watched `tables`; errors name the key.
pub(crate) fn validate(
    commands: &[CommandConfig],
    resources: &[ResourceConfig],
    tables: &[TableConfig],
) -> Result<(), String> {
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
        match (c.model, &c.overlay) {
            (WriteModel::WriteBehind, None) => {
                return Err(format!(
                    "{}: a write-behind command needs [cache.commands.overlay] (resource, params, set): \
                     what readers see before Postgres has it",
                    at("overlay")
                ));
            }
            (WriteModel::WriteThrough, Some(_)) => {
                return Err(format!("{}: only a write-behind command has an overlay", at("overlay")));
            }
            (WriteModel::WriteBehind, Some(overlay)) => check_overlay(overlay, n, resources, &at)?,
            (WriteModel::WriteThrough, None) => {}
        }
    }
    Ok(())
}

/// The overlay names a tenant resource of shape `row`, binds each of its
/// parameters, and sets at least one field, all from `$k` of the command.
fn check_overlay(
    overlay: &OverlayConfig,
    n: usize,
    resources: &[ResourceConfig],
    at: &dyn Fn(&str) -> String,
) -> Result<(), String> {
    let Some(resource) = resources.iter().find(|r| r.name == overlay.resource) else {
        return Err(format!("{}: no [[cache.resources]] is named {:?}", at("overlay.resource"), overlay.resource));
    };
    if resource.shape != Shape::Row || resource.global {
        return Err(format!(
            "{}: {:?} must be a tenant resource of shape \"row\" (the overlay patches one row's fields)",
            at("overlay.resource"),
            overlay.resource
        ));
    }
    let reference = |field: &str, name: &str, r: &str| match OverlayConfig::param_index(r) {
        Some(k) if k < n => Ok(()),
        _ => Err(format!("{}: {name} = {r:?}: expected $1…${n} (a parameter of the command)", at(field))),
    };
    for (name, r) in &overlay.params {
        if !resource.params.contains(name) {
            return Err(format!(
                "{}: {:?} has no parameter {name:?} (it takes {})",
                at("overlay.params"),
                overlay.resource,
                resource.params.join(", ")
            ));
        }
        reference("overlay.params", name, r)?;
    }
    if let Some(missing) = resource.params.iter().find(|p| !overlay.params.contains_key(*p)) {
        return Err(format!("{}: bind {:?}'s parameter {missing:?}", at("overlay.params"), overlay.resource));
    }
    if overlay.set.is_empty() {
        return Err(format!("{}: name the fields the command changes", at("overlay.set")));
    }
    for (field, r) in &overlay.set {
        if field.is_empty() {
            return Err(format!("{}: a field name is empty", at("overlay.set")));
        }
        reference("overlay.set", field, r)?;
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

    const RESOURCES: &str = "[[cache.resources]]\nname = \"user_by_id\"\n\
        sql = \"SELECT id, name FROM res_users WHERE tenant_id = $tenant AND id = $1\"\n\
        params = [\"id\"]\nshape = \"row\"\ntags = [\"res_users.id=$1\"]\nttl_ms = 1000\n\
        [[cache.resources]]\nname = \"users\"\n\
        sql = \"SELECT id, name FROM res_users WHERE tenant_id = $tenant\"\n\
        shape = \"rows\"\ntags = [\"res_users\"]\nttl_ms = 1000\n";

    fn load_behind(overlay: &str) -> Result<Config, String> {
        let command = "sql = \"UPDATE res_users SET name = $2 WHERE tenant_id = $tenant AND id = $1\"\n\
                       params = [\"id\", \"name\"]\ntags = [\"res_users.id=$1\"]\nmodel = \"write-behind\"\n";
        let text = format!("{TABLE}{RESOURCES}[[cache.commands]]\nname = \"rename\"\n{command}{overlay}");
        Config::load(&text, &BTreeMap::new()).map_err(|e| e.to_string())
    }

    #[test]
    fn write_behind_overlays_are_checked_and_errors_name_the_key() {
        let ok = "[cache.commands.overlay]\nresource = \"user_by_id\"\nparams = { id = \"$1\" }\n\
                  set = { name = \"$2\" }\n";
        let config = load_behind(ok).unwrap();
        let command = &config.cache.commands[0];
        assert_eq!(command.model, super::WriteModel::WriteBehind);
        assert_eq!(command.overlay.as_ref().unwrap().set["name"], "$2");
        let cases = [
            (String::new(), "overlay: a write-behind command needs [cache.commands.overlay]"),
            (ok.replace("\"user_by_id\"", "\"nope\""), "overlay.resource: no [[cache.resources]] is named \"nope\""),
            (ok.replace("\"user_by_id\"", "\"users\""), "overlay.resource: \"users\" must be a tenant resource"),
            (ok.replace("id = \"$1\"", "slug = \"$1\""), "overlay.params: \"user_by_id\" has no parameter \"slug\""),
            (ok.replace("{ id = \"$1\" }", "{}"), "overlay.params: bind \"user_by_id\"'s parameter \"id\""),
            (ok.replace("id = \"$1\"", "id = \"$3\""), "overlay.params: id = \"$3\": expected $1…$2"),
            (ok.replace("name = \"$2\"", "name = \"x\""), "overlay.set: name = \"x\""),
            (ok.replace("{ name = \"$2\" }", "{}"), "overlay.set: name the fields"),
            (format!("{ok}extra = 1\n"), "unknown field `extra`"),
        ];
        for (text, expected) in cases {
            let err = load_behind(&text).unwrap_err();
            assert!(err.contains(expected), "{expected}: {err}");
            assert!(err.contains("rename") || err.contains("extra"), "{err}");
        }
        // A write-through command has no overlay.
        let text = load_behind(ok).unwrap();
        let mut through = text.cache.commands[0].clone();
        through.model = super::WriteModel::WriteThrough;
        let err = super::validate(&[through], &text.cache.resources, &text.tables).unwrap_err();
        assert!(err.contains("overlay: only a write-behind command has an overlay"), "{err}");
    }
}
