//! Kafka event decoders: the first byte picks the format and whether a key
//! is present; the rest is the message value (JSON or Avro) as received.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ordercast::ingest::event::{decode, format_of};
use ordercast::ingest::settings::Format;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let format = if selector & 1 == 0 { Format::Json } else { Format::Avro };
    let key: Option<&[u8]> = if selector & 2 == 0 { Some(b"ext-1") } else { None };
    let _ = decode(Some(rest), key, format);
    let _ = format_of(Some(rest), Format::Json);
});
