//! Per-service descriptor sets, so that a server's gRPC reflection describes
//! only the services it serves (the build writes one set for every file).

use prost::Message as _;

/// The fields of a `FileDescriptorSet` needed here (others are skipped).
#[derive(Clone, PartialEq, prost::Message)]
struct FileSet {
    #[prost(bytes = "vec", repeated, tag = "1")]
    file: Vec<Vec<u8>>,
}

/// The fields of a `FileDescriptorProto` needed here.
#[derive(Clone, PartialEq, prost::Message)]
struct File {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    package: Option<String>,
    #[prost(string, repeated, tag = "3")]
    dependency: Vec<String>,
    #[prost(message, repeated, tag = "6")]
    service: Vec<Service>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Service {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
}

/// The encoded `FileDescriptorSet` of the file declaring `service` (full
/// name, e.g. `herald.v1.Cache`) and the files it imports, each file's bytes
/// unchanged. Empty when no file declares it.
pub fn service_descriptor_set(service: &str) -> Vec<u8> {
    let set = FileSet::decode(crate::FILE_DESCRIPTOR_SET).expect("the build's descriptor set decodes");
    let files: Vec<(File, &Vec<u8>)> =
        set.file.iter().map(|raw| (File::decode(raw.as_slice()).expect("a file descriptor decodes"), raw)).collect();
    let declares = |f: &File| {
        let package = f.package.as_deref().unwrap_or_default();
        f.service.iter().any(|s| format!("{package}.{}", s.name.as_deref().unwrap_or_default()) == service)
    };
    let mut wanted: Vec<String> =
        files.iter().filter(|(f, _)| declares(f)).filter_map(|(f, _)| f.name.clone()).collect();
    let mut i = 0;
    while i < wanted.len() {
        let imports =
            files.iter().find(|(f, _)| f.name.as_ref() == Some(&wanted[i])).map(|(f, _)| f.dependency.clone());
        for import in imports.unwrap_or_default() {
            if !wanted.contains(&import) {
                wanted.push(import);
            }
        }
        i += 1;
    }
    let file = files
        .iter()
        .filter(|(f, _)| f.name.as_ref().is_some_and(|n| wanted.contains(n)))
        .map(|(_, raw)| (*raw).clone());
    FileSet { file: file.collect() }.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(encoded: &[u8]) -> Vec<String> {
        let set = FileSet::decode(encoded).unwrap();
        let mut names: Vec<String> =
            set.file.iter().map(|f| File::decode(f.as_slice()).unwrap().name.unwrap()).collect();
        names.sort();
        names
    }

    #[test]
    fn a_service_gets_its_file_and_its_imports_only() {
        assert_eq!(
            names(&service_descriptor_set("herald.v1.Cache")),
            ["herald/v1/cache.proto", "herald/v1/events.proto"]
        );
        assert_eq!(names(&service_descriptor_set("herald.v1.Publisher")), ["herald/v1/publish.proto"]);
        assert!(names(&service_descriptor_set("herald.v1.Nothing")).is_empty());
    }
}
