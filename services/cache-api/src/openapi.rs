//! The HTTP API's OpenAPI 3.1 document, served at `/openapi.json`.

/// The document (`openapi.json` beside this file).
pub const DOCUMENT: &str = include_str!("openapi.json");

#[cfg(test)]
mod tests {
    #[test]
    fn document_is_json_and_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(super::DOCUMENT).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for route in
            ["/v1/t/{tenant}/r/{resource}", "/v1/t/{tenant}/k/{key}", "/v1/t/{tenant}/get", "/v1/t/{tenant}/invalidate"]
        {
            assert!(paths.contains_key(route), "{route}");
        }
    }
}
