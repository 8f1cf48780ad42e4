//! Read-through resources: configured SQL with caller parameters `$1…$n` and
//! the tenant bound by Herald, turned into JSON by Postgres itself, with the
//! tags that let capture's events find the entry.

use std::time::Duration;

use bytes::Bytes;
use herald_core::config::{OnStale, ResourceConfig, Shape};
use herald_core::keys::Scope;
use postgres_types::{Format, IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::error::SqlState;

use crate::error::{Error, Result};

/// Result columns that look like secrets (seed 003: never cache secrets).
const SECRET_WORDS: [&str; 10] =
    ["password", "passwd", "secret", "token", "api_key", "apikey", "private_key", "credential", "otp", "salt"];

/// A resource ready to serve.
#[derive(Debug)]
pub struct Resource {
    pub name: String,
    pub params: Vec<String>,
    pub shape: Shape,
    pub global: bool,
    /// The wrapped query: the value as JSON text, then one text (or text
    /// array, for `rows`) per tag column.
    sql: String,
    tags: Vec<String>,
    tag_columns: Vec<String>,
    /// How each caller parameter is made canonical.
    kinds: Vec<ParamKind>,
    pub ttl: Option<Duration>,
    pub negative_ttl: Option<Duration>,
    jitter_pct: u8,
    /// The resource's own freshness bound (the cache's default applies
    /// without one).
    pub max_staleness_ms: Option<u64>,
    pub on_stale: OnStale,
}

/// What a resource read produced.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// False when no row matched (a negative entry).
    pub found: bool,
    /// JSON.
    pub value: Bytes,
    /// Tags in the tenant's scope.
    pub tags: Vec<String>,
}

/// A parameter sent in text format: Postgres parses it as whatever type the
/// query needs, so `id = $1` and `slug = $1` both take caller strings.
#[derive(Debug)]
pub(crate) struct Text<'a>(pub(crate) &'a str);

impl ToSql for Text<'_> {
    fn to_sql(&self, _: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn encode_format(&self, _: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

/// `params` made canonical by `kinds` (see [`Resource::canonical_params`]),
/// or an error naming `what` (a resource or command) and the parameter.
pub(crate) fn canonical_params(
    what: &str,
    names: &[String],
    kinds: &[ParamKind],
    params: &[String],
) -> Result<Vec<String>> {
    params
        .iter()
        .zip(kinds)
        .enumerate()
        .map(|(i, (p, kind))| {
            kind.canonical(p).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{what}: bad parameter {} ({:?}): {p:?} is not {}",
                    i + 1,
                    names[i],
                    kind.expected()
                ))
            })
        })
        .collect()
}

/// How Postgres reads a parameter, for its canonical text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParamKind {
    /// Compared as written.
    Text,
    /// An integer type of this range.
    Int(i64, i64),
    Uuid,
    /// Anything else: passed as written, never in a `$k` tag.
    Other,
}

impl ParamKind {
    pub(crate) fn of(ty: &Type) -> Self {
        match *ty {
            Type::TEXT | Type::VARCHAR => Self::Text,
            Type::INT2 => Self::Int(i16::MIN.into(), i16::MAX.into()),
            Type::INT4 => Self::Int(i32::MIN.into(), i32::MAX.into()),
            Type::INT8 => Self::Int(i64::MIN, i64::MAX),
            Type::UUID => Self::Uuid,
            _ => Self::Other,
        }
    }

    /// The canonical text of `p`, `None` when it is not a value of the kind
    /// (stricter than Postgres: no `0x1` or `1_000`).
    pub(crate) fn canonical(self, p: &str) -> Option<String> {
        match self {
            Self::Text | Self::Other => Some(p.to_string()),
            Self::Int(min, max) => {
                let t = p.trim_matches(|c: char| c.is_ascii_whitespace() || c == '\x0b');
                let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                let n: i64 = t.strip_prefix('+').unwrap_or(t).parse().ok()?;
                (min..=max).contains(&n).then(|| n.to_string())
            }
            Self::Uuid => {
                let t = p.trim();
                let t = t.strip_prefix('{').and_then(|t| t.strip_suffix('}')).unwrap_or(t);
                let hex: String = t.chars().filter(|c| *c != '-').collect();
                if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                let h = hex.to_ascii_lowercase();
                Some(format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]))
            }
        }
    }

    /// The JSON Schema of the values `canonical` accepts (the OpenAPI
    /// document's; integers as the query parameter's text).
    pub(crate) fn schema(self) -> serde_json::Value {
        match self {
            Self::Int(min, max) => serde_json::json!({ "type": "integer", "minimum": min, "maximum": max }),
            Self::Uuid => serde_json::json!({ "type": "string", "format": "uuid" }),
            Self::Text | Self::Other => serde_json::json!({ "type": "string" }),
        }
    }

    pub(crate) fn expected(self) -> &'static str {
        match self {
            Self::Int(..) => "an integer in range",
            Self::Uuid => "a uuid",
            Self::Text | Self::Other => "valid",
        }
    }
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

impl Resource {
    /// Checks `config` against the database (the query prepares, its result
    /// columns hold no secret, tag columns exist) and builds the wrapped
    /// query. Errors name the resource.
    pub async fn compile(config: &ResourceConfig, db: &tokio_postgres::Client) -> anyhow::Result<Self> {
        let at = format!("cache.resources ({})", config.name);
        let n = config.params.len();
        let inner =
            if config.global { config.sql.clone() } else { config.sql.replace("$tenant", &format!("${}", n + 1)) };
        let stmt =
            db.prepare(&inner).await.map_err(|e| anyhow::anyhow!("{at}.sql: does not prepare: {}", db_message(&e)))?;
        let columns: Vec<String> = stmt.columns().iter().map(|c| c.name().to_string()).collect();
        let kinds: Vec<ParamKind> = stmt.params().iter().take(n).map(ParamKind::of).collect();
        for tag in &config.tags {
            for k in ResourceConfig::placeholders(tag) {
                let Some(ty) = stmt.params().get(k.wrapping_sub(1)).filter(|_| kinds[k - 1] == ParamKind::Other) else {
                    continue;
                };
                anyhow::bail!(
                    "{at}.tags: {tag:?} uses ${k} ({}), which Postgres reads as {ty}: Herald cannot make its text \
                     canonical, so an event could miss the entry; tag with the result column instead ({{column}})",
                    config.params[k - 1]
                );
            }
        }
        for c in &columns {
            let lower = c.to_ascii_lowercase();
            if SECRET_WORDS.iter().any(|w| lower.contains(w)) && !config.allow_secret_columns.contains(c) {
                anyhow::bail!(
                    "{at}.sql: selects column {c:?}, which looks like a secret; Herald never caches secrets \
                     (list it in allow_secret_columns if it is not one)"
                );
            }
        }
        let mut tag_columns: Vec<String> = Vec::new();
        for tag in &config.tags {
            for c in ResourceConfig::column_refs(tag) {
                if !columns.iter().any(|x| x == c) {
                    anyhow::bail!("{at}.tags: {tag:?} refers to {{{c}}}, which the query does not select");
                }
                if !tag_columns.iter().any(|x| x == c) {
                    tag_columns.push(c.to_string());
                }
            }
        }
        let tag_select: String = tag_columns
            .iter()
            .map(|c| match config.shape {
                Shape::Rows => format!(", array_agg(q.{}::text)", quote(c)),
                _ => format!(", q.{}::text", quote(c)),
            })
            .collect();
        let sql = match config.shape {
            Shape::Row => format!("SELECT row_to_json(q)::text{tag_select} FROM ({inner}) q LIMIT 2"),
            Shape::Rows => {
                format!("SELECT coalesce(json_agg(q), '[]'::json)::text, count(*){tag_select} FROM ({inner}) q")
            }
            Shape::Scalar => {
                if columns.len() != 1 {
                    anyhow::bail!(
                        "{at}.shape: scalar needs exactly one result column, the query has {}",
                        columns.len()
                    );
                }
                format!("SELECT to_json(q.{})::text{tag_select} FROM ({inner}) q LIMIT 2", quote(&columns[0]))
            }
        };
        db.prepare(&sql)
            .await
            .map_err(|e| anyhow::anyhow!("{at}: wrapped query does not prepare: {}", db_message(&e)))?;
        let ttl = (config.ttl_ms > 0).then(|| Duration::from_millis(config.ttl_ms));
        let negative_ttl = (config.negative_ttl_ms > 0).then(|| Duration::from_millis(config.negative_ttl_ms));
        Ok(Self {
            name: config.name.clone(),
            params: config.params.clone(),
            shape: config.shape,
            global: config.global,
            sql,
            tags: config.tags.clone(),
            tag_columns,
            kinds,
            ttl,
            negative_ttl,
            jitter_pct: config.ttl_jitter_pct,
            max_staleness_ms: config.max_staleness_ms,
            on_stale: config.on_stale,
        })
    }

    /// The JSON Schema of parameter `i` (a string when out of range).
    pub fn param_schema(&self, i: usize) -> serde_json::Value {
        self.kinds.get(i).map_or_else(|| serde_json::json!({ "type": "string" }), |k| k.schema())
    }

    /// The caller's parameters, checked and canonical: the text an event's
    /// tag carries for the same value (`01`, ` 1` and `+1` are `1`), so the
    /// entry's key and `$k` tags match what capture emits.
    pub fn canonical_params(&self, params: &[String]) -> Result<Vec<String>> {
        self.check_params(params)?;
        canonical_params(&format!("resource {:?}", self.name), &self.params, &self.kinds, params)
    }

    /// Checks the caller's parameters.
    fn check_params(&self, params: &[String]) -> Result<()> {
        if params.len() != self.params.len() {
            return Err(Error::InvalidArgument(format!(
                "resource {:?} takes {} parameter(s) ({}), got {}",
                self.name,
                self.params.len(),
                self.params.join(", "),
                params.len()
            )));
        }
        Ok(())
    }

    /// The key part of an entry: the parameters, escaped so that distinct
    /// parameter lists never share a key.
    pub fn key(&self, params: &[String]) -> Result<String> {
        let mut key = String::from("p");
        for p in params {
            key.push(':');
            for b in p.bytes() {
                if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@') {
                    key.push(b as char);
                } else {
                    key.push_str(&format!("%{b:02X}"));
                }
            }
        }
        if key.len() > 512 {
            return Err(Error::InvalidArgument(format!("parameters of {:?} are too long for a key", self.name)));
        }
        Ok(key)
    }

    /// The TTL of a value: the resource's (or the negative one), spread by
    /// the jitter. `None` is unlimited; `Some(0)` means "do not cache".
    pub fn ttl_for(&self, found: bool) -> Option<Duration> {
        let base = if found { self.ttl } else { Some(self.negative_ttl.unwrap_or(Duration::ZERO)) };
        base.map(|ttl| {
            let spread = ttl.as_millis() as u64 * u64::from(self.jitter_pct) / 100;
            ttl + Duration::from_millis(if spread > 0 { rand::random_range(0..=spread) } else { 0 })
        })
    }

    /// Reads the resource for `scope` from Postgres.
    pub async fn fetch(&self, db: &deadpool_postgres::Client, scope: &Scope, params: &[String]) -> Result<Fetched> {
        let tenant = match scope {
            Scope::Tenant(t) => Some(t.as_str()),
            Scope::Global => None,
        };
        let mut args: Vec<Text<'_>> = params.iter().map(|p| Text(p)).collect();
        if !self.global {
            args.push(Text(tenant.ok_or_else(|| Error::Internal("tenant resource without tenant".into()))?));
        }
        let refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        let stmt = db.prepare_cached(&self.sql).await.map_err(|e| query_error(&self.name, &e))?;
        let rows = db.query(&stmt, &refs).await.map_err(|e| query_error(&self.name, &e))?;
        let k = self.tag_columns.len();
        let (found, value, columns): (bool, String, Vec<Vec<Option<String>>>) = match self.shape {
            Shape::Row | Shape::Scalar => {
                if rows.len() > 1 {
                    return Err(Error::Internal(format!("resource {:?} returned more than one row", self.name)));
                }
                match rows.first() {
                    None => (false, "null".into(), vec![Vec::new(); k]),
                    Some(row) => {
                        let value: Option<String> = row.get(0);
                        let columns = (0..k).map(|i| vec![row.get::<_, Option<String>>(i + 1)]).collect();
                        (true, value.unwrap_or_else(|| "null".into()), columns)
                    }
                }
            }
            Shape::Rows => {
                let row = rows.first().ok_or_else(|| Error::Internal("aggregate returned no row".into()))?;
                let value: String = row.get(0);
                let count: i64 = row.get(1);
                let columns =
                    (0..k).map(|i| row.get::<_, Option<Vec<Option<String>>>>(i + 2).unwrap_or_default()).collect();
                (count > 0, value, columns)
            }
        };
        let rows_n = columns.first().map_or(1, Vec::len);
        let mut tags = Vec::new();
        for template in &self.tags {
            if ResourceConfig::column_refs(template).is_empty() {
                tags.push(render(template, params, |_| None));
                continue;
            }
            for r in 0..rows_n {
                let lookup = |c: &str| {
                    let i = self.tag_columns.iter().position(|x| x == c)?;
                    columns[i].get(r).cloned().flatten()
                };
                if ResourceConfig::column_refs(template).iter().all(|c| lookup(c).is_some()) {
                    tags.push(render(template, params, lookup));
                }
            }
        }
        tags.sort();
        tags.dedup();
        Ok(Fetched { found, value: Bytes::from(value), tags })
    }
}

/// Fills a tag template: `$k` with parameter k, `{column}` from `column`.
pub(crate) fn render(template: &str, params: &[String], column: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let bytes = template.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'$' => {
                let digits = bytes[i + 1..].iter().take_while(|b| b.is_ascii_digit()).count();
                let k: usize = template[i + 1..i + 1 + digits].parse().unwrap_or(0);
                match params.get(k.wrapping_sub(1)) {
                    Some(p) if digits > 0 => out.push_str(p),
                    _ => out.push_str(&template[i..i + 1 + digits]),
                }
                i += 1 + digits;
            }
            b'{' => match template[i..].find('}') {
                Some(close) => {
                    out.push_str(&column(&template[i + 1..i + close]).unwrap_or_default());
                    i += close + 1;
                }
                None => {
                    out.push('{');
                    i += 1;
                }
            },
            _ => {
                let next = template[i..].find(['$', '{']).map_or(template.len(), |n| i + n);
                out.push_str(&template[i..next]);
                i = next;
            }
        }
    }
    out
}

pub(crate) fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string())
}

/// Whether a query failed because its connection did (closed, terminated by
/// an administrator, server shutting down or out of connections): another
/// connection may work, and the caller's request was not at fault.
pub fn connection_failed(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => true,
        Some(code) => {
            let c = code.code();
            c.starts_with("08") || c.starts_with("53") || c.starts_with("57P")
        }
    }
}

/// A failed resource query: bad parameter text is the caller's error; a lost
/// connection means Postgres is unavailable.
fn query_error(resource: &str, e: &tokio_postgres::Error) -> Error {
    if connection_failed(e) {
        return Error::Unavailable(format!("postgres: {}", db_message(e)));
    }
    if e.code() == Some(&SqlState::QUERY_CANCELED) {
        return Error::Unavailable(format!(
            "resource {resource:?}: the query ran longer than cache.query_timeout_ms and was cancelled"
        ));
    }
    match e.code() {
        Some(code)
            if *code == SqlState::INVALID_TEXT_REPRESENTATION
                || *code == SqlState::NUMERIC_VALUE_OUT_OF_RANGE
                || *code == SqlState::INVALID_DATETIME_FORMAT
                || *code == SqlState::DATETIME_FIELD_OVERFLOW
                || *code == SqlState::CHARACTER_NOT_IN_REPERTOIRE
                || *code == SqlState::UNTRANSLATABLE_CHARACTER =>
        {
            Error::InvalidArgument(format!("resource {resource:?}: bad parameter: {}", db_message(e)))
        }
        _ => {
            // Postgres's text may show the schema or data: it goes to the
            // log, the caller gets an id to find it there.
            let id = format!("{:08x}", rand::random::<u32>());
            tracing::error!(resource, error_id = %id, error = %db_message(e), "resource query failed");
            Error::Internal(format!("resource {resource:?}: the query failed (error id {id} in the node's log)"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_made_canonical() {
        let int4 = ParamKind::of(&Type::INT4);
        for p in ["1", "01", " 1", "+1", "1 ", "\t001\n"] {
            assert_eq!(int4.canonical(p).as_deref(), Some("1"), "{p:?}");
        }
        assert_eq!(int4.canonical("-007").as_deref(), Some("-7"));
        assert_eq!(int4.canonical("-0").as_deref(), Some("0"));
        for p in ["", "+", "1 2", "0x1", "1_000", "abc", "2147483648", "++1"] {
            assert_eq!(int4.canonical(p), None, "{p:?}");
        }
        assert_eq!(ParamKind::of(&Type::INT8).canonical("2147483648").as_deref(), Some("2147483648"));
        let uuid = ParamKind::of(&Type::UUID);
        let canonical = Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
        for p in [
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc999c0b4ef8bb6d6bb9bd380a11}",
            "a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11",
        ] {
            assert_eq!(uuid.canonical(p).as_deref(), canonical, "{p:?}");
        }
        assert_eq!(ParamKind::of(&Type::TEXT).canonical(" Alice ").as_deref(), Some(" Alice "));
    }

    #[test]
    fn renders_templates() {
        let params = vec!["alice".to_string(), "7".to_string()];
        assert_eq!(render("res_users.website_slug=$1", &params, |_| None), "res_users.website_slug=alice");
        assert_eq!(render("a=$2,b=$1", &params, |_| None), "a=7,b=alice");
        assert_eq!(render("res_users.id={id}", &params, |c| (c == "id").then(|| "5".into())), "res_users.id=5");
        assert_eq!(render("x$9{", &params, |_| None), "x$9{");
    }
}
