//! Unit tests of the GGUF reader and writer: round trips of every value type, hand-made
//! malformed headers, truncation at every byte, and a seeded byte-mutation loop (a bounded,
//! cargo-fuzz-free fuzz test) that asserts the parser only ever succeeds or returns a
//! `Error::Format`.

use super::limits::*;
use super::*;
use crate::error::Error;

fn ty(name: &str) -> &'static GgmlType {
    GgmlType::parse(name).unwrap()
}

fn sample_metadata() -> Vec<(String, Value)> {
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("u8".into(), Value::U8(200)),
        ("i8".into(), Value::I8(-100)),
        ("u16".into(), Value::U16(60000)),
        ("i16".into(), Value::I16(-30000)),
        ("u32".into(), Value::U32(4_000_000_000)),
        ("i32".into(), Value::I32(-2_000_000_000)),
        ("f32".into(), Value::F32(1.5e-3)),
        ("bool".into(), Value::Bool(true)),
        ("str".into(), Value::String("héllo ✓".into())),
        ("u64".into(), Value::U64(u64::MAX)),
        ("i64".into(), Value::I64(i64::MIN)),
        ("f64".into(), Value::F64(-2.25e300)),
        ("a.u8".into(), Value::Array(Array::U8(vec![1, 2, 3]))),
        ("a.i32".into(), Value::Array(Array::I32(vec![-1, 7]))),
        ("a.f32".into(), Value::Array(Array::F32(vec![0.5, -0.25]))),
        (
            "a.bool".into(),
            Value::Array(Array::Bool(vec![true, false])),
        ),
        (
            "a.str".into(),
            Value::Array(Array::String(vec!["a".into(), "".into(), "ü".into()])),
        ),
        ("a.empty".into(), Value::Array(Array::U64(vec![]))),
        (
            "a.nested".into(),
            Value::Array(Array::Array(vec![
                Array::I16(vec![1, -2]),
                Array::String(vec!["x".into()]),
                Array::Array(vec![Array::F64(vec![1.0])]),
            ])),
        ),
    ]
}

fn sample_tensors() -> Vec<(TensorDesc, Vec<u8>)> {
    let f32_data: Vec<u8> = (0..12u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    vec![
        (
            TensorDesc {
                name: "w.f32".into(),
                dims: vec![4, 3],
                ggml_type: ty("f32"),
            },
            f32_data,
        ),
        (
            TensorDesc {
                name: "w.q4_0".into(),
                dims: vec![64, 2],
                ggml_type: ty("q4_0"),
            },
            (0..4 * 18).map(|i| i as u8).collect(),
        ),
        (
            TensorDesc {
                name: "empty".into(),
                dims: vec![0, 5],
                ggml_type: ty("f16"),
            },
            vec![],
        ),
        (
            TensorDesc {
                name: "scalar".into(),
                dims: vec![],
                ggml_type: ty("i32"),
            },
            vec![1, 2, 3, 4],
        ),
    ]
}

fn sample_file_bytes(dir: &std::path::Path) -> Vec<u8> {
    let path = dir.join("sample.gguf");
    let t = sample_tensors();
    let refs: Vec<(TensorDesc, &[u8])> = t.iter().map(|(d, b)| (d.clone(), b.as_slice())).collect();
    write_file(&path, &sample_metadata(), &refs).unwrap();
    std::fs::read(&path).unwrap()
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("fq-gguf-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn round_trip_every_value_type_and_tensor() {
    let dir = tmpdir("rt");
    let path = dir.join("sample.gguf");
    let t = sample_tensors();
    let refs: Vec<(TensorDesc, &[u8])> = t.iter().map(|(d, b)| (d.clone(), b.as_slice())).collect();
    write_file(&path, &sample_metadata(), &refs).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let h = f.header();
    assert_eq!(h.version, 3);
    assert_eq!(h.alignment, 32);
    assert_eq!(h.data_offset % 32, 0);
    let got: Vec<(String, Value)> = h
        .metadata
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone()))
        .collect();
    assert_eq!(got, sample_metadata());
    assert_eq!(h.tensors.len(), t.len());
    for (info, (desc, data)) in h.tensors.iter().zip(&t) {
        assert_eq!(info.name, desc.name);
        assert_eq!(info.dims, desc.dims);
        assert_eq!(info.ggml_type, desc.ggml_type);
        assert_eq!(info.offset % 32, 0);
        assert_eq!(f.tensor_data(info).unwrap(), data.as_slice());
    }
    assert_eq!(h.tensor("scalar").unwrap().n_elements, 1);
    // The file ends with the padded last tensor.
    assert_eq!(f.bytes().len() as u64 % 32, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn custom_alignment_is_used_and_checked() {
    let dir = tmpdir("align");
    let path = dir.join("a.gguf");
    let md = vec![("general.alignment".to_string(), Value::U32(64))];
    let d = TensorDesc {
        name: "a".into(),
        dims: vec![3],
        ggml_type: ty("f32"),
    };
    let d2 = TensorDesc {
        name: "b".into(),
        ..d.clone()
    };
    write_file(&path, &md, &[(d.clone(), &[0u8; 12]), (d2, &[1u8; 12])]).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.header().alignment, 64);
    assert_eq!(f.header().data_offset % 64, 0);
    assert_eq!(f.header().tensors[1].offset, 64);
    for bad_align in [Value::U32(48), Value::U32(0), Value::U64(32)] {
        let md = vec![("general.alignment".to_string(), bad_align)];
        assert!(matches!(
            write_file(&path, &md, &[]),
            Err(Error::InvalidArgument(_))
        ));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn streaming_writer_checks_order_and_sizes_and_is_atomic() {
    let dir = tmpdir("atomic");
    let path = dir.join("m.gguf");
    std::fs::write(&path, b"old contents").unwrap();
    let d = TensorDesc {
        name: "a".into(),
        dims: vec![2],
        ggml_type: ty("f32"),
    };
    let mut w = Writer::create(&path, &[], std::slice::from_ref(&d)).unwrap();
    assert_eq!(w.next_tensor(), Some("a"));
    assert!(w.write_tensor(&[0u8; 7]).is_err());
    // Not all tensors written: finish fails, the old file stays, no temp file is left.
    let w2 = Writer::create(&path, &[], std::slice::from_ref(&d)).unwrap();
    assert!(w2.finish().is_err());
    drop(w);
    assert_eq!(std::fs::read(&path).unwrap(), b"old contents");
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // A finished writer replaces the file.
    let mut w = Writer::create(&path, &[], &[d]).unwrap();
    w.write_tensor(&[0u8; 8]).unwrap();
    assert!(w.write_tensor(&[0u8; 8]).is_err());
    w.finish().unwrap();
    assert_eq!(GgufFile::open(&path).unwrap().header().tensors.len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn writer_rejects_bad_descriptions() {
    let dir = tmpdir("badw");
    let p = dir.join("x.gguf");
    let d = |name: &str, dims: Vec<u64>, t: &str| TensorDesc {
        name: name.into(),
        dims,
        ggml_type: ty(t),
    };
    for descs in [
        vec![d("a", vec![2], "f32"), d("a", vec![2], "f32")],
        vec![d("a", vec![33], "q4_0")],
        vec![d("a", vec![1, 1, 1, 1, 1], "f32")],
        vec![d("a", vec![u64::MAX, 2], "f32")],
    ] {
        assert!(Writer::create(&p, &[], &descs).is_err(), "{descs:?}");
    }
    let md = vec![
        ("k".to_string(), Value::U8(1)),
        ("k".to_string(), Value::U8(2)),
    ];
    assert!(Writer::create(&p, &md, &[]).is_err());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn format_err(bytes: &[u8]) -> (String, u64, String) {
    match parse_header(bytes) {
        Err(Error::Format {
            field,
            offset,
            message,
        }) => (field, offset, message),
        other => panic!("expected a format error, got {other:?}"),
    }
}

/// A minimal header with the given counts.
fn head(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&n_tensors.to_le_bytes());
    b.extend_from_slice(&n_kv.to_le_bytes());
    b
}

fn kv(b: &mut Vec<u8>, key: &str, vtype: u32, payload: &[u8]) {
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key.as_bytes());
    b.extend_from_slice(&vtype.to_le_bytes());
    b.extend_from_slice(payload);
}

fn ti(b: &mut Vec<u8>, name: &str, dims: &[u64], t: u32, offset: u64) {
    b.extend_from_slice(&(name.len() as u64).to_le_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend_from_slice(&d.to_le_bytes());
    }
    b.extend_from_slice(&t.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
}

#[test]
fn version_and_magic() {
    assert_eq!(format_err(b"GGU").0, "header.magic");
    assert_eq!(format_err(b"GGML\x03\0\0\0").0, "header.magic");
    let (f, o, m) = format_err(&head(1, 0, 0));
    assert_eq!((f.as_str(), o), ("header.version", 4));
    assert!(m.contains("version 1"), "{m}");
    assert!(format_err(&head(0x0300_0000, 0, 0))
        .2
        .contains("big-endian"));
    assert!(format_err(&head(4, 0, 0)).2.contains("unsupported"));
    assert_eq!(parse_header(&head(2, 0, 0)).unwrap().version, 2);
    assert_eq!(parse_header(&head(3, 0, 0)).unwrap().version, 3);
}

#[test]
fn huge_counts_and_lengths_fail_before_allocating() {
    let (f, o, _) = format_err(&head(3, 0, u64::MAX));
    assert_eq!((f.as_str(), o), ("header.kv_count", 16));
    let (f, o, _) = format_err(&head(3, u64::MAX / 2, 0));
    assert_eq!((f.as_str(), o), ("header.tensor_count", 8));
    // A key length of 2^63.
    let mut b = head(3, 0, 1);
    b.extend_from_slice(&(1u64 << 63).to_le_bytes());
    b.extend_from_slice(&[0; 16]);
    let (f, o, _) = format_err(&b);
    assert_eq!((f.as_str(), o), ("metadata[0].key.length", 24));
    // An array claiming 2^61 u64 elements.
    let mut b = head(3, 0, 1);
    let mut payload = 10u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&(1u64 << 61).to_le_bytes());
    kv(&mut b, "k", 9, &payload);
    assert!(format_err(&b).0.ends_with(".count"));
    // Arrays nested deeper than the limit (each level announces one array element).
    let mut b = head(3, 0, 1);
    let mut payload = Vec::new();
    for _ in 0..MAX_NESTING + 4 {
        payload.extend_from_slice(&9u32.to_le_bytes());
        payload.extend_from_slice(&1u64.to_le_bytes());
    }
    payload.extend_from_slice(&[0; 64]);
    kv(&mut b, "deep", 9, &payload);
    assert!(format_err(&b).2.contains("nested"));
}

#[test]
fn bad_values_types_and_keys() {
    let mut b = head(3, 0, 1);
    kv(&mut b, "k", 13, &[0; 8]);
    assert_eq!(format_err(&b).0, "metadata \"k\".type");
    let mut b = head(3, 0, 1);
    kv(&mut b, "k", 7, &[2]);
    assert!(format_err(&b).2.contains("bool"));
    let mut b = head(3, 0, 1);
    kv(&mut b, "k", 8, &[2, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe]);
    let (f, o, m) = format_err(&b);
    assert_eq!((f.as_str(), o), ("metadata \"k\"", 24 + 8 + 1 + 4 + 8));
    assert!(m.contains("UTF-8"));
    let mut b = head(3, 0, 2);
    kv(&mut b, "k", 0, &[1]);
    kv(&mut b, "k", 0, &[1]);
    assert!(format_err(&b).2.contains("duplicate key"));
    let mut b = head(3, 0, 1);
    kv(&mut b, "general.alignment", 4, &24u32.to_le_bytes());
    assert!(format_err(&b).2.contains("power of two"));
    let mut b = head(3, 0, 1);
    kv(&mut b, "general.alignment", 10, &32u64.to_le_bytes());
    assert!(format_err(&b).2.contains("uint32"));
}

/// A file with one f32 tensor of `dims` and the given type and offset, data padded after.
fn one_tensor(name: &str, dims: &[u64], t: u32, offset: u64, data: usize) -> Vec<u8> {
    let mut b = head(3, 1, 0);
    ti(&mut b, name, dims, t, offset);
    b.resize(b.len().next_multiple_of(32) + data, 0);
    b
}

#[test]
fn bad_tensor_infos() {
    assert!(parse_header(&one_tensor("t", &[4, 2], 0, 0, 32)).is_ok());
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (one_tensor("t", &[4, 2], 0, 0, 31), "runs past the end"),
        (
            one_tensor("t", &[4, 2], 0, 8, 64),
            "not a multiple of the alignment",
        ),
        (
            one_tensor("t", &[4, 2], 0, u64::MAX - 31, 64),
            "runs past the end",
        ),
        (
            one_tensor("t", &[4, 2], 5, 0, 64),
            "unknown ggml tensor type 5",
        ),
        (
            one_tensor("t", &[4, 2], 99, 0, 64),
            "unknown ggml tensor type 99",
        ),
        (
            one_tensor("t", &[1 << 31, 1 << 30], 0, 0, 64),
            "runs past the end",
        ),
        (one_tensor("t", &[1 << 31, 1 << 31], 0, 0, 64), "overflow"),
        (
            one_tensor("t", &[1 << 32, 1 << 31, 4], 0, 0, 64),
            "overflow",
        ),
        (one_tensor("t", &[u64::MAX], 0, 0, 64), "overflow"),
        (one_tensor("t", &[48], 2, 0, 64), "block size"),
        (one_tensor("t", &[1; 5], 0, 0, 64), "at most 4"),
    ];
    for (bytes, want) in cases {
        let (_, _, m) = format_err(&bytes);
        assert!(m.contains(want), "{m:?} lacks {want:?}");
    }
    // Overlapping and duplicate tensors.
    let mut b = head(3, 2, 0);
    ti(&mut b, "a", &[16], 0, 0);
    ti(&mut b, "b", &[16], 0, 32);
    b.resize(b.len().next_multiple_of(32) + 128, 0);
    let (f, _, m) = format_err(&b);
    assert!(f.contains("\"b\"") && m.contains("overlaps"), "{f} {m}");
    let mut b = head(3, 2, 0);
    ti(&mut b, "a", &[8], 0, 0);
    ti(&mut b, "a", &[8], 0, 32);
    b.resize(b.len().next_multiple_of(32) + 128, 0);
    assert!(format_err(&b).2.contains("duplicate tensor"));
}

#[test]
fn truncation_at_every_byte_is_a_format_error() {
    let dir = tmpdir("trunc");
    let bytes = sample_file_bytes(&dir);
    let full = parse_header(&bytes).unwrap();
    let data_end = full.data_offset as usize + 32; // the first tensor lies inside [data, +48)
    for n in 0..data_end {
        match parse_header(&bytes[..n]) {
            Err(Error::Format { offset, .. }) => assert!(offset <= n as u64, "cut {n}"),
            other => panic!("cut at {n}: expected a format error, got {other:?}"),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// xorshift64*: a fixed-seed generator so the mutation loop is reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn seeded_mutation_fuzz_never_panics() {
    let dir = tmpdir("fuzz");
    let base = sample_file_bytes(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    let header_len = parse_header(&base).unwrap().data_offset as usize;
    let seed = crate::config::fuzz_seed().unwrap_or(0x9e37_79b9_7f4a_7c15);
    let mut rng = Rng(seed | 1);
    let interesting: [u64; 8] = [0, 1, 0xff, 0xffff_ffff, 1 << 32, 1 << 63, u64::MAX, 13];
    let (mut ok, mut bad_count) = (0, 0);
    // FERROQUANT_FUZZ_ITERS runs it longer (e.g. a bounded-time CI job); the default keeps
    // `cargo test` fast.
    let iters = crate::config::fuzz_iters().unwrap_or(20_000);
    for _ in 0..iters {
        let mut b = base.clone();
        for _ in 0..1 + rng.below(4) {
            if b.is_empty() {
                break;
            }
            let at = rng.below(header_len.min(b.len()));
            match rng.below(5) {
                0 => b[at] = rng.next() as u8,
                1 => b[at] ^= 1 << rng.below(8),
                2 => {
                    let v = interesting[rng.below(interesting.len())].to_le_bytes();
                    let w = [1, 4, 8][rng.below(3)];
                    for (i, x) in v.iter().take(w).enumerate() {
                        if at + i < b.len() {
                            b[at + i] = *x;
                        }
                    }
                }
                3 => b.truncate(at),
                _ => {
                    let extra: Vec<u8> = (0..rng.below(16)).map(|_| rng.next() as u8).collect();
                    b.splice(at..at, extra);
                }
            }
        }
        match parse_header(&b) {
            Ok(h) => {
                // Whatever parses must describe tensors that lie inside the bytes.
                for t in &h.tensors {
                    let end = h.data_offset + t.offset + t.nbytes;
                    assert!(end <= b.len() as u64);
                }
                ok += 1;
            }
            Err(Error::Format { .. }) => bad_count += 1,
            Err(e) => panic!("unexpected error kind {e:?}"),
        }
    }
    assert!(ok > 0 && bad_count > 0, "ok {ok}, errors {bad_count}");
}
