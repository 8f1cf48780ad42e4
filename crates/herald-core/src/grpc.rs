//! What every Herald gRPC port serves beside its own service: reflection in
//! v1 and v1alpha (older clients, such as Python's `grpcio-reflection`,
//! speak only v1alpha), describing exactly what the port serves: its own
//! service, gRPC health and reflection itself.

use tonic_reflection::server::{Builder, Error, v1, v1alpha};

/// Reflection services (v1, v1alpha) for a port serving gRPC health and the
/// service `descriptors` describe
/// (`herald_proto::service_descriptor_set("herald.v1.Cache")`).
pub fn reflection(
    descriptors: &[u8],
) -> Result<
    (
        v1::ServerReflectionServer<impl v1::ServerReflection>,
        v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
    ),
    Error,
> {
    let builder = || {
        Builder::configure()
            .register_encoded_file_descriptor_set(descriptors)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}
