//! Generates the gRPC code from `proto/` with a vendored `protoc`, so a fresh clone builds
//! without a system protobuf compiler.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/loyalty/v1/common.proto",
    "proto/loyalty/v1/gifts.proto",
    "proto/loyalty/v1/checkout.proto",
    "proto/loyalty/v1/member.proto",
    "proto/loyalty/v1/program.proto",
    "proto/loyalty/v1/engagement.proto",
    "proto/loyalty/v1/standing.proto",
];

/// Messages that carry personal contact data or a credential get a hand-written, redacting
/// `Debug` (see `src/pb.rs`) so that they can never be logged by accident.
const CONTACT_DATA_MESSAGES: &[&str] = &[
    "loyalty.v1.Customer",
    "loyalty.v1.EnrollCustomerRequest",
    "loyalty.v1.IssueCustomerTokenResponse",
    // Gift codes are bearer secrets.
    "loyalty.v1.GiftGrant",
    "loyalty.v1.RedeemGiftRequest",
    "loyalty.v1.ListCustomerGiftsRequest",
    "loyalty.v1.ListCustomerGiftsResponse",
    // Greetings carry names, contact addresses, gift codes and lease tokens.
    "loyalty.v1.Greeting",
    "loyalty.v1.ContactPoint",
    "loyalty.v1.UpcomingOccasion",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("loyalty_descriptor.bin"))
        .skip_debug(CONTACT_DATA_MESSAGES.iter().copied())
        .compile_protos(
            &PROTOS.iter().map(PathBuf::from).collect::<Vec<_>>(),
            &[PathBuf::from("proto"), well_known],
        )?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
