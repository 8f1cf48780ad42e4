//! The HTTP API's OpenAPI 3.1 document, served at `/openapi.json`: built
//! from the node's config, so each configured resource has its own path with
//! its named query parameters, and every limit the server enforces
//! (`cache.max_*`) is stated as the JSON Schema constraint it is.

use herald_core::config::{CacheConfig, CommandConfig, ResourceConfig, WriteModel};
use serde_json::{Value, json};

use crate::api::MAX_GET_MANY;

/// A tenant id: 1 to 64 of `A-Z a-z 0-9 _ . -` (`TenantId::new`).
pub const TENANT_PATTERN: &str = "^[A-Za-z0-9_.-]{1,64}$";
/// A key (or key prefix): no control characters, no Unicode whitespace and
/// no braces (`validate_key_part`); 1 to 512 bytes, stated as characters.
pub const KEY_PATTERN: &str =
    "^[^\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000{}]{1,512}$";
/// A caller's tag: no control characters (`char::is_control`).
pub const TAG_PATTERN: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$";
/// `x-herald-min-lsn`: a Postgres LSN (`16/B374D848`) or its 64-bit value.
pub const LSN_PATTERN: &str = "^([0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}|[0-9]{1,20})$";

/// The JSON Schema of a resource's parameter (by resource name and index):
/// what the server accepts, from the types Postgres gave the query.
pub type ParamSchema<'a> = &'a dyn Fn(&str, usize) -> Value;

/// The document for a node with `config`.
pub fn document(config: &CacheConfig, param_schema: ParamSchema<'_>) -> Value {
    let mut paths = serde_json::Map::new();
    let names: Vec<&str> = config.resources.iter().map(|r| r.name.as_str()).collect();
    paths.insert("/v1/t/{tenant}/r/{resource}".into(), generic_resource_path());
    for res in &config.resources {
        paths.insert(format!("/v1/t/{{tenant}}/r/{}", res.name), resource_path(res, param_schema));
    }
    paths.insert("/v1/t/{tenant}/k/{key}".into(), key_path(config));
    paths.insert("/v1/t/{tenant}/k/{key}/add".into(), add_path(config));
    paths.insert("/v1/t/{tenant}/k/{key}/incr".into(), incr_path());
    paths.insert("/v1/t/{tenant}/get".into(), get_many_path());
    paths.insert("/v1/t/{tenant}/invalidate".into(), invalidate_path(config));
    for command in &config.commands {
        paths.insert(format!("/v1/t/{{tenant}}/w/{}", command.name), write_path(command));
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Herald cache API",
            "version": "1",
            "description": "Tenant-aware cache: L1 in RAM, L2 in Redis, coherent read-through to Postgres. \
                Every route names a tenant; the bearer token must be bound to it. Errors are \
                {\"error\": {\"code\", \"message\"}} with 400 (bad input), 401 (no or unknown token), \
                403 (token not bound to the tenant), 404 (unknown resource or route), 413 (a value or \
                body over cache.max_value_bytes), 500 (a resource query failed; the message carries an \
                error id for the node's log), 503 (a dependency is down)."
        },
        "components": components(config, &names),
        "security": [{ "bearer": [] }],
        "paths": paths,
    })
}

fn components(config: &CacheConfig, resources: &[&str]) -> Value {
    json!({
        "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
        "parameters": {
            "tenant": {
                "name": "tenant", "in": "path", "required": true,
                "schema": { "type": "string", "pattern": TENANT_PATTERN }
            },
            "resource": {
                "name": "resource", "in": "path", "required": true,
                "description": "a configured resource's name",
                "schema": if resources.is_empty() {
                    json!({ "type": "string", "minLength": 1 })
                } else {
                    json!({ "type": "string", "enum": resources })
                }
            },
            "key": {
                "name": "key", "in": "path", "required": true,
                "description": "1 to 512 bytes, no whitespace, control characters or braces",
                "schema": { "type": "string", "pattern": KEY_PATTERN }
            },
            "minLsn": {
                "name": "x-herald-min-lsn", "in": "header", "required": false,
                "description": "Read-your-writes: the caller's commit LSN (pg_current_wal_lsn() after its \
                    commit). Answers come only from cache state that applied invalidations up to it, or \
                    from Postgres.",
                "schema": { "type": "string", "pattern": LSN_PATTERN, "examples": ["16/B374D848"] }
            }
        },
        "schemas": {
            "Error": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": { "code": { "type": "string" }, "message": { "type": "string" } },
                        "required": ["code", "message"]
                    }
                },
                "required": ["error"]
            },
            "Layer": { "type": "string", "enum": ["l1", "l2", "database", "none"] },
            "Answer": {
                "type": "object",
                "properties": {
                    "found": { "type": "boolean" },
                    "layer": { "$ref": "#/components/schemas/Layer" },
                    "value": { "description": "the JSON value; null for a negative entry" },
                    "pending": {
                        "type": "boolean",
                        "description": "present (true) when write-behind commands not yet in this node's cache are merged in"
                    }
                },
                "required": ["found", "layer", "value"]
            },
            "BinaryAnswer": {
                "type": "object",
                "description": "an explicit key's value that is not JSON, or a miss (with the fill token)",
                "properties": {
                    "found": { "type": "boolean" },
                    "layer": { "$ref": "#/components/schemas/Layer" },
                    "value_base64": { "type": "string", "contentEncoding": "base64" },
                    "fill_token": { "type": "string" }
                },
                "required": ["found", "layer", "value_base64", "fill_token"]
            },
            "Deleted": {
                "type": "object",
                "properties": {
                    "deleted": {
                        "type": "integer", "minimum": 0,
                        "description": "L2 entries deleted; L1 entries are dropped on every node"
                    }
                },
                "required": ["deleted"]
            },
            "Stored": {
                "type": "object",
                "properties": { "stored": { "type": "boolean" } },
                "required": ["stored"]
            },
            "Tag": {
                "type": "string", "minLength": 1, "maxLength": config.max_tag_bytes, "pattern": TAG_PATTERN,
                "description": format!("at most {} bytes (cache.max_tag_bytes)", config.max_tag_bytes)
            },
            "GetItem": {
                "oneOf": [
                    {
                        "type": "object",
                        "properties": {
                            "resource": { "type": "string", "minLength": 1 },
                            "params": { "type": "array", "items": { "type": "string" } }
                        },
                        "required": ["resource"],
                        "additionalProperties": false
                    },
                    {
                        "type": "object",
                        "properties": { "key": { "type": "string", "pattern": KEY_PATTERN } },
                        "required": ["key"],
                        "additionalProperties": false
                    }
                ]
            },
            "GetResult": {
                "oneOf": [
                    { "$ref": "#/components/schemas/Answer" },
                    { "$ref": "#/components/schemas/BinaryAnswer" },
                    { "$ref": "#/components/schemas/Error" }
                ]
            }
        },
        "responses": {
            "Error": error_response("error"),
            "TooLarge": error_response("value or request body over cache.max_value_bytes"),
        }
    })
}

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

fn json_response(description: &str, schema: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } })
}

/// The error responses of a route: `codes` besides 400, 401, 403 and 503.
fn errors(ok: Value, codes: &[&str]) -> Value {
    let mut responses = serde_json::Map::new();
    for (code, value) in ok.as_object().into_iter().flatten() {
        responses.insert(code.clone(), value.clone());
    }
    for code in ["400", "401", "403", "503"].iter().chain(codes) {
        let value = match *code {
            "413" => json!({ "$ref": "#/components/responses/TooLarge" }),
            _ => json!({ "$ref": "#/components/responses/Error" }),
        };
        responses.entry(code.to_string()).or_insert(value);
    }
    Value::Object(responses)
}

fn path_params(names: &[&str]) -> Value {
    names.iter().map(|n| json!({ "$ref": format!("#/components/parameters/{n}") })).collect()
}

fn json_body(schema: Value) -> Value {
    json!({ "required": true, "content": { "application/json": { "schema": schema } } })
}

fn resource_ops(id: &str, summary: &str, query: Vec<Value>) -> Value {
    let mut get_params = vec![json!({ "$ref": "#/components/parameters/minLsn" })];
    get_params.extend(query.iter().cloned());
    json!({
        "get": {
            "operationId": format!("get{id}"),
            "summary": summary,
            "parameters": get_params,
            "responses": errors(json!({ "200": json_response("the value", "Answer") }), &["404", "500"])
        },
        "delete": {
            "operationId": format!("delete{id}"),
            "summary": "Drop this entry on every node (a global resource's: trusted tokens only, else 403).",
            "parameters": query,
            "responses": errors(json!({ "200": json_response("dropped", "Deleted") }), &["404", "500"])
        }
    })
}

/// Any resource, its parameters given in order as `p` (`?p=alice`).
fn generic_resource_path() -> Value {
    let p = json!({
        "name": "p", "in": "query", "required": false, "style": "form", "explode": true,
        "description": "the resource's parameters in order",
        "schema": { "type": "array", "items": { "type": "string" } }
    });
    let mut path = resource_ops(
        "Resource",
        "Get a configured resource by name, its parameters in order (?p=alice). Each resource also has \
         its own path with named parameters.",
        vec![p],
    );
    path["parameters"] = path_params(&["tenant", "resource"]);
    path
}

/// One configured resource, its parameters by name (`?slug=alice`).
fn resource_path(res: &ResourceConfig, param_schema: ParamSchema<'_>) -> Value {
    let query = res
        .params
        .iter()
        .enumerate()
        .map(|(i, name)| {
            json!({
                "name": name, "in": "query", "required": true,
                "description": format!("${} of the resource's query, as text Postgres reads as its type", i + 1),
                "schema": param_schema(&res.name, i)
            })
        })
        .collect();
    let id = camel(&res.name);
    let summary = format!("Get resource {:?} ({:?} shape).", res.name, res.shape);
    let mut path = resource_ops(&format!("Resource{id}"), &summary, query);
    path["parameters"] = path_params(&["tenant"]);
    path
}

/// `user_by_slug` → `UserBySlug`, for operation ids.
fn camel(name: &str) -> String {
    name.split(['_', '-', '.'])
        .map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_uppercase().chain(c).collect::<String>()).unwrap_or_default()
        })
        .collect()
}

fn key_path(config: &CacheConfig) -> Value {
    json!({
        "parameters": path_params(&["tenant", "key"]),
        "get": {
            "operationId": "getKey",
            "summary": "Get an explicit key.",
            "parameters": [{ "$ref": "#/components/parameters/minLsn" }],
            "responses": errors(json!({
                "200": {
                    "description": "the stored bytes; x-herald-layer says which layer answered",
                    "headers": { "x-herald-layer": { "schema": { "$ref": "#/components/schemas/Layer" } } },
                    "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } }
                },
                "404": {
                    "description": "not cached; x-herald-fill-token carries the token that gates a following PUT \
                        (absent while Redis is down)",
                    "headers": { "x-herald-fill-token": { "schema": { "type": "string" } } },
                    "content": { "application/json": { "schema": {
                        "type": "object", "properties": { "found": { "const": false } }, "required": ["found"]
                    } } }
                }
            }), &[])
        },
        "put": {
            "operationId": "setKey",
            "summary": "Store an explicit key. With a fill token (query fill_token or header \
                x-herald-fill-token) the store is refused (409) when any of its tags was invalidated since \
                the miss that issued the token.",
            "parameters": [
                ttl_and_tags(config)[0],
                ttl_and_tags(config)[1],
                { "name": "fill_token", "in": "query", "schema": { "type": "string" } },
                { "name": "x-herald-fill-token", "in": "header", "schema": { "type": "string" } }
            ],
            "requestBody": value_body(config),
            "responses": errors(json!({
                "200": json_response("stored", "Stored"),
                "409": json_response("refused: an invalidation passed the fill token ({\"stored\": false})", "Stored")
            }), &["413"])
        },
        "delete": {
            "operationId": "deleteKey",
            "summary": "Drop an explicit key on every node.",
            "responses": errors(json!({ "200": json_response("dropped", "Deleted") }), &[])
        }
    })
}

/// `ttl_ms` and repeated `tag`, as PUT and Add take them.
fn ttl_and_tags(config: &CacheConfig) -> [Value; 2] {
    [
        json!({
            "name": "ttl_ms", "in": "query",
            "description": "0 or absent: cache.key_ttl_ms",
            "schema": { "type": "integer", "minimum": 0, "maximum": config.max_key_ttl_ms }
        }),
        json!({
            "name": "tag", "in": "query", "style": "form", "explode": true,
            "schema": {
                "type": "array", "maxItems": config.max_tags_per_request,
                "items": { "$ref": "#/components/schemas/Tag" }
            }
        }),
    ]
}

/// The raw value a PUT or Add stores.
fn value_body(config: &CacheConfig) -> Value {
    json!({
        "required": true,
        "description": format!("the value: at most {} bytes (cache.max_value_bytes)", config.max_value_bytes),
        "content": { "application/octet-stream": { "schema": {
            "type": "string", "format": "binary", "maxLength": config.max_value_bytes
        } } }
    })
}

fn add_path(config: &CacheConfig) -> Value {
    json!({
        "parameters": path_params(&["tenant", "key"]),
        "post": {
            "operationId": "addKey",
            "summary": "Store an explicit key only when nothing is cached under it (atomic across nodes).",
            "parameters": ttl_and_tags(config),
            "requestBody": value_body(config),
            "responses": errors(json!({
                "200": json_response("stored", "Stored"),
                "409": json_response("not stored: an entry is cached under the key ({\"stored\": false})", "Stored")
            }), &["413"])
        }
    })
}

fn incr_path() -> Value {
    json!({
        "parameters": path_params(&["tenant", "key"]),
        "post": {
            "operationId": "incrKey",
            "summary": "Add delta to an explicit key holding a decimal integer, atomically across nodes; the \
                entry keeps its expiry and tags. 400 when the value is not an integer or the sum overflows \
                64 bits.",
            "requestBody": json_body(json!({
                "type": "object",
                "properties": { "delta": { "type": "integer", "minimum": i64::MIN, "maximum": i64::MAX } },
                "required": ["delta"],
                "additionalProperties": false
            })),
            "responses": errors(json!({
                "200": {
                    "description": "the value after the increment",
                    "content": { "application/json": { "schema": {
                        "type": "object",
                        "properties": { "found": { "const": true }, "value": { "type": "integer" } },
                        "required": ["found", "value"]
                    } } }
                },
                "404": {
                    "description": "nothing is cached under the key",
                    "content": { "application/json": { "schema": {
                        "type": "object", "properties": { "found": { "const": false } }, "required": ["found"]
                    } } }
                }
            }), &[])
        }
    })
}

fn get_many_path() -> Value {
    json!({
        "parameters": path_params(&["tenant"]),
        "post": {
            "operationId": "getMany",
            "summary": format!(
                "Several lookups of one tenant (at most {MAX_GET_MANY}); each result is an answer or an error. \
                 Results past cache.max_get_many_bytes are resource_exhausted errors."
            ),
            "parameters": [{ "$ref": "#/components/parameters/minLsn" }],
            "requestBody": json_body(json!({
                "type": "object",
                "properties": {
                    "items": { "type": "array", "maxItems": MAX_GET_MANY, "items": { "$ref": "#/components/schemas/GetItem" } }
                },
                "required": ["items"],
                "additionalProperties": false
            })),
            "responses": errors(json!({
                "200": {
                    "description": "one result per item, in order; non-JSON values as value_base64",
                    "content": { "application/json": { "schema": {
                        "type": "object",
                        "properties": { "results": { "type": "array", "items": { "$ref": "#/components/schemas/GetResult" } } },
                        "required": ["results"]
                    } } }
                }
            }), &["413"])
        }
    })
}

fn invalidate_path(config: &CacheConfig) -> Value {
    let one = |name: &str, schema: Value| json!({ "type": "object", "properties": { name: schema }, "required": [name], "additionalProperties": false });
    json!({
        "parameters": path_params(&["tenant"]),
        "post": {
            "operationId": "invalidate",
            "summary": "Drop entries on every node: by tags ({\"tags\": [...]}) or in bulk ({\"resource\": name} | \
                {\"key_prefix\": p} | {\"all\": true}).",
            "requestBody": json_body(json!({ "oneOf": [
                one("tags", json!({
                    "type": "array", "minItems": 1, "maxItems": config.max_tags_per_request,
                    "items": { "$ref": "#/components/schemas/Tag" }
                })),
                one("resource", json!({ "type": "string", "minLength": 1 })),
                one("key_prefix", json!({ "type": "string", "pattern": KEY_PATTERN })),
                one("all", json!({ "const": true }))
            ] })),
            "responses": errors(json!({ "200": json_response("dropped", "Deleted") }), &["404", "413"])
        }
    })
}

/// One configured write command (`write.rs`), its parameters by name.
fn write_path(command: &CommandConfig) -> Value {
    let value = json!({ "type": ["string", "number", "boolean"] });
    let named: serde_json::Map<String, Value> = command.params.iter().map(|p| (p.clone(), value.clone())).collect();
    let (summary, answer) = match command.model {
        WriteModel::WriteThrough => (
            format!(
                "Run command {:?} (write-through): returns after the commit, after its tags were dropped on \
                 every node, and once every live node applied the changes up to the commit (at most \
                 cache.write_wait_ms; wait_reached says whether they did).",
                command.name
            ),
            json!({
                "description": "committed",
                "content": { "application/json": { "schema": {
                    "type": "object",
                    "properties": {
                        "rows_affected": { "type": "integer", "minimum": 0 },
                        "commit_lsn": {
                            "type": "string", "pattern": LSN_PATTERN,
                            "description": "the position after the commit; usable as x-herald-min-lsn"
                        },
                        "wait_reached": {
                            "type": "boolean",
                            "description": "every live node applied the changes up to commit_lsn in time"
                        }
                    },
                    "required": ["rows_affected", "commit_lsn", "wait_reached"]
                } } }
            }),
        ),
        WriteModel::WriteBehind => (
            format!(
                "Enqueue command {:?} (write-behind): returns once the command is durable in the tenant's \
                 command stream; readers see it at once (answers marked pending); a writer applies it to \
                 Postgres exactly once, in order.",
                command.name
            ),
            json!({
                "description": "enqueued",
                "content": { "application/json": { "schema": {
                    "type": "object",
                    "properties": {
                        "command_id": {
                            "type": "string",
                            "description": "recorded in herald.applied_commands when the command is applied"
                        },
                        "pending": { "const": true }
                    },
                    "required": ["command_id", "pending"]
                } } }
            }),
        ),
    };
    json!({
        "parameters": path_params(&["tenant"]),
        "post": {
            "operationId": format!("write{}", camel(&command.name)),
            "summary": summary,
            "requestBody": json_body(json!({
                "type": "object",
                "properties": {
                    "params": {
                        "oneOf": [
                            { "type": "object", "properties": named, "required": command.params, "additionalProperties": false },
                            { "type": "array", "items": value, "minItems": command.params.len(), "maxItems": command.params.len() }
                        ]
                    }
                },
                "additionalProperties": false
            })),
            "responses": errors(json!({ "200": answer }), &["413", "500"])
        }
    })
}

#[cfg(test)]
mod tests {
    use herald_core::config::Shape;

    use super::*;

    #[test]
    fn document_has_a_path_per_resource_with_its_parameters() {
        let config = CacheConfig {
            resources: vec![ResourceConfig {
                name: "user_by_slug".into(),
                sql: "SELECT 1 WHERE $1 = $tenant".into(),
                params: vec!["slug".into()],
                shape: Shape::Row,
                tags: Vec::new(),
                ttl_ms: 1000,
                unlimited_ttl_reason: None,
                negative_ttl_ms: 0,
                ttl_jitter_pct: 0,
                global: false,
                allow_secret_columns: Vec::new(),
                max_staleness_ms: None,
                on_stale: Default::default(),
            }],
            commands: vec![CommandConfig {
                name: "rename_user".into(),
                sql: "UPDATE res_users SET name = $2 WHERE tenant_id = $tenant AND id = $1".into(),
                params: vec!["id".into(), "name".into()],
                tags: vec!["res_users.id=$1".into()],
                model: Default::default(),
                overlay: None,
            }],
            ..CacheConfig::default()
        };
        let doc = document(&config, &|_, _| json!({ "type": "integer" }));
        let paths = doc["paths"].as_object().unwrap();
        for route in [
            "/v1/t/{tenant}/r/{resource}",
            "/v1/t/{tenant}/r/user_by_slug",
            "/v1/t/{tenant}/k/{key}",
            "/v1/t/{tenant}/k/{key}/add",
            "/v1/t/{tenant}/k/{key}/incr",
            "/v1/t/{tenant}/get",
            "/v1/t/{tenant}/invalidate",
            "/v1/t/{tenant}/w/rename_user",
        ] {
            assert!(paths.contains_key(route), "{route}");
        }
        let write = &paths["/v1/t/{tenant}/w/rename_user"]["post"];
        assert_eq!(write["operationId"], "writeRenameUser");
        let named = &write["requestBody"]["content"]["application/json"]["schema"]["properties"]["params"]["oneOf"][0];
        assert_eq!(named["required"], json!(["id", "name"]));
        let get = &paths["/v1/t/{tenant}/r/user_by_slug"]["get"];
        assert_eq!(get["operationId"], "getResourceUserBySlug");
        let slug = get["parameters"].as_array().unwrap().iter().find(|p| p["name"] == "slug").unwrap();
        assert_eq!((&slug["required"], &slug["schema"]["type"]), (&json!(true), &json!("integer")));
        let tags = &doc["components"]["schemas"]["Tag"];
        assert_eq!(tags["maxLength"], config.max_tag_bytes);
        assert_eq!(
            paths["/v1/t/{tenant}/k/{key}"]["put"]["responses"]["413"]["$ref"],
            "#/components/responses/TooLarge"
        );
    }
}
