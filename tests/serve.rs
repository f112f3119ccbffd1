//! End-to-end tests of `evax serve`: a server on a free port, a real HTTP client, the answers
//! checked against the reference fixtures (logits, pre-logits and Grad-CAM of the Ti
//! fine-tuned model on the NIH images), and the hostile cases: bad bodies, wrong tokens, a
//! full queue, shutdown with requests in flight.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use evax::checkpoint::{Checkpoint, Param};
use evax::fixtures::shared_or_skip;
use evax::model::LoadOptions;
use evax::predict::PredictorOptions;
use evax::serve::{ModelSpec, ServeOptions, Server};
use serde_json::Value;

const MODEL: &str = "eva_x_ti_cxr14_ft.pth";

fn options(shared: &Path) -> ServeOptions {
    let spec = ModelSpec::parse(
        &format!("ti={}", shared.join("fixtures").join(MODEL).display()),
        PredictorOptions {
            load: LoadOptions {
                device: evax::fixtures::test_device(),
                ..Default::default()
            },
            batch: 8,
            ..Default::default()
        },
    )
    .unwrap();
    ServeOptions {
        models: vec![spec],
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        max_batch: 8,
        decode_threads: 2,
        ..ServeOptions::default()
    }
}

fn image(shared: &Path, name: &str) -> Vec<u8> {
    std::fs::read(shared.join("fixtures/images").join(name)).unwrap()
}

fn dicom_file(shared: &Path) -> PathBuf {
    shared.join("data/dicom/siim_chest_jpeg_baseline.dcm")
}

fn reference(shared: &Path) -> BTreeMap<String, Param> {
    Checkpoint::load(shared.join("fixtures/reference.safetensors"))
        .unwrap()
        .tensors
}

/// Row `row` of a `[rows, n]` reference tensor.
fn reference_row(p: &Param, row: usize) -> Vec<f32> {
    let n = *p.shape.last().unwrap();
    p.data[row * n..(row + 1) * n].to_vec()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Max |a - b| after checking equal, non-zero lengths.
fn max_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "length");
    assert!(!got.is_empty());
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    fn new(addr: SocketAddr) -> Self {
        Client {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
        }
    }

    async fn post(&self, path: &str, body: Vec<u8>) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .body(body)
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }
}

/// The error code of a JSON error answer, after checking its status.
async fn error_code(r: reqwest::Response, status: u16) -> String {
    assert_eq!(r.status().as_u16(), status);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    v["error"]["code"].as_str().unwrap().to_string()
}

/// The value of an unlabelled or labelled sample in a Prometheus text.
fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn answers_match_the_reference_for_png_and_the_other_inputs_work() {
    let Some(shared) =
        shared_or_skip("answers_match_the_reference_for_png_and_the_other_inputs_work")
    else {
        return;
    };
    let r = reference(&shared);
    let server = Server::start(options(&shared)).unwrap();
    let c = Client::new(server.addr());
    let rt = runtime();
    rt.block_on(async {
        // Service endpoints.
        let v: Value = c.get("/healthz").await.json().await.unwrap();
        assert_eq!(v["status"], "ok");
        let v: Value = c.get("/readyz").await.json().await.unwrap();
        assert_eq!(v["models"], serde_json::json!(["ti"]));
        let v: Value = c.get("/v1/models").await.json().await.unwrap();
        let models = v["models"].as_array().unwrap();
        assert_eq!(models.len(), 1);
        assert_eq!(models[0]["architecture"], "EVA-X-Ti");
        assert_eq!(models[0]["labels"].as_array().unwrap().len(), 14);
        let sha = evax::io::sha256_file(&shared.join("fixtures").join(MODEL)).unwrap();
        assert_eq!(sha.len(), 64);
        assert_eq!(models[0]["checkpoint_sha256"], sha.as_str());
        let v: Value = c.get("/openapi.json").await.json().await.unwrap();
        assert_eq!(v["openapi"], "3.0.3");
        assert_eq!(v["paths"].as_object().unwrap().len(), 8);
        // No token configured: the document asks for none.
        assert!(v.get("security").is_none(), "{}", v["security"]);

        // PNG: logits against the original's, both NIH images, concurrently (one batch or
        // two, whichever the batcher makes of them).
        let names = ["00000001_000.png", "00003440_000.png"];
        let (a0, a1) = tokio::join!(
            c.post("/v1/models/ti/predict", image(&shared, names[0])),
            c.post("/v1/models/ti/predict", image(&shared, names[1]))
        );
        for (i, a) in [a0, a1].into_iter().enumerate() {
            assert_eq!(a.status().as_u16(), 200);
            let v: Value = a.json().await.unwrap();
            assert_eq!(v["labels"].as_array().unwrap().len(), 14);
            assert_eq!(v["checkpoint_sha256"], sha.as_str());
            assert_eq!(v["preprocessing"]["decoded_as"], "png");
            assert_eq!(
                v["preprocessing"]["center_crop"],
                serde_json::json!([224, 224])
            );
            let d = max_diff(&floats(&v["logits"]), &reference_row(&r["ti_ft/logits"], i));
            eprintln!("{}: logits max abs diff {d:.2e} (tolerance 1e-4)", names[i]);
            assert!(d <= 1e-4, "{}: {d}", names[i]);
            let probs = floats(&v["probabilities"]);
            let findings = v["findings"].as_array().unwrap();
            assert_eq!(findings.len(), probs.iter().filter(|p| **p >= 0.5).count());
        }

        // Embeddings: the pre-logits (fc_norm output), as JSON and as .npy.
        let v: Value = c
            .post("/v1/models/ti/embed", image(&shared, names[0]))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["dim"], 192);
        let d = max_diff(
            &floats(&v["pooled"]),
            &reference_row(&r["ti_ft/prelogits"], 0),
        );
        eprintln!("embed: pooled max abs diff {d:.2e} (tolerance 1e-4)");
        assert!(d <= 1e-4, "{d}");
        let a = c
            .post("/v1/models/ti/embed?format=npy", image(&shared, names[0]))
            .await;
        assert_eq!(a.headers()["content-type"], "application/x-npy");
        let npy_dir = common::scratch("serve-npy");
        let npy_path = npy_dir.join("pooled.npy");
        std::fs::write(&npy_path, a.bytes().await.unwrap()).unwrap();
        let (shape, data) = common::read_npy(&npy_path);
        assert_eq!(shape, vec![1, 192]);
        assert!(max_diff(&data, &reference_row(&r["ti_ft/prelogits"], 0)) <= 1e-4);

        // Grad-CAM of class 1 and class 7 (by name) on image 0, against pytorch-grad-cam.
        for (query, key) in [("1", "gradcam/class1"), ("pneumothorax", "gradcam/class7")] {
            let v: Value = c
                .post(
                    &format!("/v1/models/ti/predict?cam={query}"),
                    image(&shared, names[0]),
                )
                .await
                .json()
                .await
                .unwrap();
            assert_eq!(v["cam"]["size"], serde_json::json!([224, 224]));
            let rows = v["cam"]["map"].as_array().unwrap();
            assert_eq!(rows.len(), 224);
            let map: Vec<f32> = rows.iter().flat_map(floats).collect();
            let d = max_diff(&map, &r[key].data);
            eprintln!("cam={query}: max abs diff {d:.2e} against {key} (tolerance 1e-3)");
            assert!(d <= 1e-3, "{key}: {d}");
        }

        // The overlay: the whole 512 x 512 radiograph plus the colour bar.
        let a = c
            .post("/v1/models/ti/cam?cam=top", image(&shared, names[0]))
            .await;
        assert_eq!(a.status().as_u16(), 200);
        assert_eq!(a.headers()["content-type"], "image/png");
        let png = evax::preprocess::Image::decode(&a.bytes().await.unwrap()).unwrap();
        assert_eq!(png.height, 512);
        assert!(png.width > 512, "{}", png.width);

        // JPEG and DICOM inputs.
        let a = c
            .post("/v1/models/ti/predict", image(&shared, "16747_3_1.jpg"))
            .await;
        assert_eq!(a.status().as_u16(), 200);
        let v: Value = a.json().await.unwrap();
        assert_eq!(v["preprocessing"]["decoded_as"], "jpeg");
        assert_eq!(v["probabilities"].as_array().unwrap().len(), 14);
        let dcm = std::fs::read(dicom_file(&shared)).unwrap();
        let v: Value = c
            .post("/v1/models/ti/predict", dcm.clone())
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["preprocessing"]["decoded_as"], "dicom");
        assert_eq!(v["probabilities"].as_array().unwrap().len(), 14);

        // Metrics count what was served.
        let text = c.get("/metrics").await.text().await.unwrap();
        let served = metric(
            &text,
            "evax_requests_total{endpoint=\"predict\",model=\"ti\",status=\"200\"}",
        );
        assert_eq!(served, Some(6.0), "{text}");
        assert!(metric(&text, "evax_batch_size_count{model=\"ti\"}").unwrap() >= 1.0);
        assert!(metric(&text, "process_resident_memory_bytes").unwrap() > 1e6);
        assert_eq!(metric(&text, "evax_in_flight"), Some(0.0));
    });
    server.shutdown().unwrap();
}

/// Await every future (in order) on the current runtime, concurrently.
async fn futures_join<F: std::future::Future<Output = T> + Send + 'static, T: Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<T> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[test]
fn dicom_inputs_get_dicom_results_on_request() {
    let Some(shared) = shared_or_skip("dicom_inputs_get_dicom_results_on_request") else {
        return;
    };
    let server = Server::start(options(&shared)).unwrap();
    let c = Client::new(server.addr());
    let src = dicom_file(&shared);
    let source = evax::dicom::DicomFile::open(&src).unwrap();
    let source_obj = dicom_object::open_file(&src).unwrap();
    use dicom_dictionary_std::tags;
    let text_of = |o: &dicom_object::DefaultDicomObject, tag| {
        o.element(tag)
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches(['\0', ' '])
            .to_string()
    };
    let study = text_of(&source_obj, tags::STUDY_INSTANCE_UID);
    assert!(!study.is_empty());
    let dir = common::scratch("serve-dicom");
    runtime().block_on(async {
        let accept = |path: &str, body: Vec<u8>| {
            c.http
                .post(format!("{}{path}", c.base))
                .header("accept", "application/dicom")
                .body(body)
                .send()
        };
        let dcm = std::fs::read(&src).unwrap();
        let json: Value = c
            .post("/v1/models/ti/predict", dcm.clone())
            .await
            .json()
            .await
            .unwrap();
        let labels = json["labels"].as_array().unwrap();
        let probs = floats(&json["probabilities"]);
        assert_eq!((labels.len(), probs.len()), (14, 14));

        // The Structured Report, read back with dicom-rs: the same probabilities.
        let a = accept("/v1/models/ti/predict", dcm.clone()).await.unwrap();
        assert_eq!(a.status().as_u16(), 200);
        assert_eq!(a.headers()["content-type"], "application/dicom");
        let sr = dir.join("sr.dcm");
        std::fs::write(&sr, a.bytes().await.unwrap()).unwrap();
        let report = evax::dicom::results::read_report(&sr).unwrap().unwrap();
        assert_eq!(report.sop_class, evax::dicom::results::ENHANCED_SR);
        assert_eq!(report.study, study);
        assert_eq!(report.patient_id, text_of(&source_obj, tags::PATIENT_ID));
        assert!(report.sop_instance.starts_with("2.25."));
        assert_eq!(
            report.evidence,
            vec![text_of(&source_obj, tags::SOP_INSTANCE_UID)]
        );
        let model = report.items.iter().find(|(n, _)| n == "Model").unwrap();
        assert_eq!(model.1, "EVA-X-Ti");
        let mut compared = 0;
        for (label, p) in labels.iter().zip(&probs) {
            let (_, v) = report
                .items
                .iter()
                .find(|(n, _)| n == label.as_str().unwrap())
                .unwrap_or_else(|| panic!("{label} missing: {:?}", report.items));
            let stored: f32 = v.split_whitespace().next().unwrap().parse().unwrap();
            assert!((stored - p).abs() <= 1e-6, "{label}: {v} vs {p}");
            compared += 1;
        }
        assert_eq!(compared, 14);

        // The Secondary Capture of the overlay: same study, the image's rows, RGB.
        let a = accept("/v1/models/ti/cam", dcm.clone()).await.unwrap();
        assert_eq!(a.status().as_u16(), 200);
        let sc_path = dir.join("sc.dcm");
        std::fs::write(&sc_path, a.bytes().await.unwrap()).unwrap();
        let sc = dicom_object::open_file(&sc_path).unwrap();
        assert_eq!(
            text_of(&sc, tags::SOP_CLASS_UID),
            evax::dicom::results::SECONDARY_CAPTURE
        );
        assert_eq!(text_of(&sc, tags::STUDY_INSTANCE_UID), study);
        assert_eq!(text_of(&sc, tags::PHOTOMETRIC_INTERPRETATION), "RGB");
        let rows: u16 = sc.element(tags::ROWS).unwrap().to_int().unwrap();
        let cols: u16 = sc.element(tags::COLUMNS).unwrap().to_int().unwrap();
        assert_eq!(rows as usize, source.info.rows);
        assert!(cols as usize > source.info.cols);

        // A PNG cannot have DICOM results.
        let a = accept("/v1/models/ti/predict", image(&shared, "00000001_000.png"))
            .await
            .unwrap();
        assert_eq!(error_code(a, 406).await, "not_acceptable");
    });
    server.shutdown().unwrap();
}

/// Send raw bytes and read the answer's status line and body.
fn raw_http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the answer's body is complete (the server closes or the JSON ends).
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&out);
                if let Some((_, body)) = text.split_once("\r\n\r\n")
                    && body.trim_end().ends_with('}')
                {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

#[test]
fn bad_requests_get_json_errors_with_stable_codes() {
    let Some(shared) = shared_or_skip("bad_requests_get_json_errors_with_stable_codes") else {
        return;
    };
    let mut o = options(&shared);
    o.body_limit = 4 << 20;
    let server = Server::start(o).unwrap();
    let addr = server.addr();
    let c = Client::new(addr);
    let png = image(&shared, "00000001_000.png");
    runtime().block_on(async {
        let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
            ("/v1/models/ti/predict", Vec::new(), 400, "empty_body"),
            (
                "/v1/models/ti/predict",
                png[..png.len() / 2].to_vec(),
                422,
                "bad_image",
            ),
            (
                "/v1/models/ti/predict",
                png[..40].to_vec(),
                422,
                "bad_image",
            ),
            (
                "/v1/models/ti/predict",
                b"GIF89a\x01\x00\x01\x00".to_vec(),
                415,
                "unsupported_type",
            ),
            (
                "/v1/models/ti/predict",
                b"{\"image\": \"x.png\"}".to_vec(),
                415,
                "unsupported_type",
            ),
            ("/v1/models/nope/predict", png.clone(), 404, "unknown_model"),
            (
                "/v1/models/ti/predict?cam=Broken",
                png.clone(),
                400,
                "unknown_finding",
            ),
            (
                "/v1/models/ti/predict?threshold=abc",
                png.clone(),
                400,
                "bad_parameter",
            ),
            (
                "/v1/models/ti/embed?cam=top",
                png.clone(),
                400,
                "bad_parameter",
            ),
            ("/v1/models/ti/classify", png.clone(), 404, "not_found"),
        ];
        let n = cases.len();
        for (path, body, status, code) in cases {
            let got = error_code(c.post(path, body).await, status).await;
            assert_eq!(got, code, "{path}");
        }
        assert_eq!(n, 10);
    });
    // A huge claimed size is refused from the header, before any body arrives.
    let (status, body) = raw_http(
        addr,
        b"POST /v1/models/ti/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000\r\n\r\n",
    );
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("body_too_large"), "{body}");
    // A chunked body (no length announced) that grows past the limit: refused once it does.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(
        b"POST /v1/models/ti/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .unwrap();
    let piece = vec![0x89u8; 1 << 20];
    for _ in 0..4 {
        s.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
            .unwrap();
        s.write_all(&piece).unwrap();
        s.write_all(b"\r\n").unwrap();
    }
    s.write_all(b"1\r\nx\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
    // A body cut short (the client stops sending and closes its side).
    let mut req = format!(
        "POST /v1/models/ti/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        png.len()
    )
    .into_bytes();
    req.extend_from_slice(&png[..1000]);
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&req).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    // The server is still well after all of that.
    runtime().block_on(async {
        assert_eq!(
            c.post("/v1/models/ti/predict", png.clone())
                .await
                .status()
                .as_u16(),
            200
        );
        let text = c.get("/metrics").await.text().await.unwrap();
        assert_eq!(
            metric(&text, "evax_failures_total{kind=\"unsupported_type\"}"),
            Some(2.0)
        );
        assert_eq!(metric(&text, "evax_in_flight"), Some(0.0));
    });
    server.shutdown().unwrap();
}

#[test]
fn a_token_guards_the_api_but_not_the_probes() {
    let Some(shared) = shared_or_skip("a_token_guards_the_api_but_not_the_probes") else {
        return;
    };
    let mut o = options(&shared);
    o.token = Some("s3cret-token".into());
    let server = Server::start(o).unwrap();
    let c = Client::new(server.addr());
    let png = image(&shared, "00000001_000.png");
    runtime().block_on(async {
        let with = |token: Option<&str>, path: &str| {
            let mut r = c.http.post(format!("{}{path}", c.base)).body(png.clone());
            if let Some(t) = token {
                r = r.header("authorization", format!("Bearer {t}"));
            }
            r.send()
        };
        let a = with(None, "/v1/models/ti/predict").await.unwrap();
        assert!(a.headers().contains_key("www-authenticate"));
        assert_eq!(error_code(a, 401).await, "unauthorized");
        for wrong in ["s3cret-tokem", "s3cret-token-", "", "S3CRET-TOKEN"] {
            let a = with(Some(wrong), "/v1/models/ti/predict").await.unwrap();
            assert_eq!(error_code(a, 401).await, "unauthorized", "{wrong:?}");
        }
        let a = with(Some("s3cret-token"), "/v1/models/ti/predict")
            .await
            .unwrap();
        assert_eq!(a.status().as_u16(), 200);
        assert_eq!(c.get("/healthz").await.status().as_u16(), 200);
        assert_eq!(c.get("/readyz").await.status().as_u16(), 200);
        let doc: Value = c.get("/openapi.json").await.json().await.unwrap();
        assert_eq!(doc["security"], serde_json::json!([{"bearer": []}]));
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        assert_eq!(
            error_code(c.get("/metrics").await, 401).await,
            "unauthorized"
        );
        assert_eq!(
            error_code(c.get("/v1/models").await, 401).await,
            "unauthorized"
        );
    });
    server.shutdown().unwrap();
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let Some(shared) = shared_or_skip("a_full_queue_answers_503_with_retry_after") else {
        return;
    };
    let mut o = options(&shared);
    o.queue = 1;
    o.max_batch = 1;
    let server = Server::start(o).unwrap();
    let c = std::sync::Arc::new(Client::new(server.addr()));
    let png = image(&shared, "00000001_000.png");
    runtime().block_on(async {
        let answers = futures_join((0..12).map(|_| {
            let c = c.clone();
            let png = png.clone();
            async move {
                let a = c.post("/v1/models/ti/predict", png).await;
                let retry = a.headers().get("retry-after").cloned();
                let status = a.status().as_u16();
                let body: Value = a.json().await.unwrap();
                (status, retry, body)
            }
        }))
        .await;
        assert_eq!(answers.len(), 12);
        let ok = answers.iter().filter(|a| a.0 == 200).count();
        let full: Vec<_> = answers.iter().filter(|a| a.0 == 503).collect();
        eprintln!(
            "12 concurrent requests, queue 1: {ok} answered, {} refused",
            full.len()
        );
        assert_eq!(ok + full.len(), 12);
        assert!(ok >= 1 && !full.is_empty());
        for (_, retry, body) in &full {
            assert_eq!(retry.as_ref().unwrap(), "1");
            assert_eq!(body["error"]["code"], "queue_full");
        }
    });
    server.shutdown().unwrap();
}

/// Start `n` predictions of `png` on `rt` and wait until the server counts all of them in
/// flight; the handles give each answer's status.
fn predictions_in_flight(
    rt: &tokio::runtime::Runtime,
    c: &std::sync::Arc<Client>,
    png: &[u8],
    n: usize,
) -> Vec<tokio::task::JoinHandle<u16>> {
    let pending: Vec<_> = (0..n)
        .map(|_| {
            let c = c.clone();
            let png = png.to_vec();
            rt.spawn(async move { c.post("/v1/models/ti/predict", png).await.status().as_u16() })
        })
        .collect();
    let admitted = rt.block_on(async {
        for _ in 0..2000 {
            let text = c.get("/metrics").await.text().await.unwrap();
            if metric(&text, "evax_in_flight") == Some(n as f64) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        false
    });
    assert!(admitted, "the {n} requests were not all in flight at once");
    pending
}

/// The statuses of `pending`, in order.
fn statuses(rt: &tokio::runtime::Runtime, pending: Vec<tokio::task::JoinHandle<u16>>) -> Vec<u16> {
    rt.block_on(async {
        let mut s = Vec::new();
        for p in pending {
            s.push(p.await.unwrap());
        }
        s
    })
}

#[test]
fn shutdown_answers_every_accepted_request() {
    let Some(shared) = shared_or_skip("shutdown_answers_every_accepted_request") else {
        return;
    };
    let mut o = options(&shared);
    o.max_batch = 1;
    let server = Server::start(o).unwrap();
    let addr = server.addr();
    let c = std::sync::Arc::new(Client::new(addr));
    let png = image(&shared, "00000001_000.png");
    let rt = runtime();
    // Eight admitted at once (computed one at a time), then stop.
    let pending = predictions_in_flight(&rt, &c, &png, 8);
    server.shutdown().unwrap();
    assert_eq!(statuses(&rt, pending), vec![200; 8]);
    // Nothing listens any more.
    assert!(std::net::TcpStream::connect(addr).is_err());
}

/// `evax serve` as a user runs it: it announces its address, answers, and on SIGTERM finishes
/// the request in flight, then exits 0.
#[test]
fn the_command_serves_and_stops_on_sigterm() {
    let Some(shared) = shared_or_skip("the_command_serves_and_stops_on_sigterm") else {
        return;
    };
    use std::io::BufRead;
    let weights = shared.join("fixtures").join(MODEL);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_evax"))
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--max-batch",
            "1",
            "--weights",
        ])
        .arg(format!("ti={}", weights.display()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr: SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address announced: {line}"))
        .parse()
        .unwrap();
    let c = std::sync::Arc::new(Client::new(addr));
    let png = image(&shared, "00003440_000.png");
    let rt = runtime();
    assert_eq!(
        rt.block_on(c.post("/v1/models/ti/predict", png.clone()))
            .status()
            .as_u16(),
        200
    );
    // Two requests in flight, then SIGTERM.
    let pending = predictions_in_flight(&rt, &c, &png, 2);
    // SAFETY: kill only sends a signal to the child we started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    assert_eq!(statuses(&rt, pending), vec![200, 200]);
    let status = child.wait().unwrap();
    let mut rest = String::new();
    let _ = err.read_to_string(&mut rest);
    assert!(status.success(), "{rest}");
    assert!(
        rest.contains("SIGTERM") && rest.contains("stopped"),
        "{rest}"
    );
}

/// Weights without a head (the Ti MIM fixture) are served for embeddings: `pooled` is the
/// original's (`ti_mim/pooled`), and predict / cam answer `no_head`.
#[test]
fn mim_weights_embed_and_refuse_to_predict() {
    let Some(shared) = shared_or_skip("mim_weights_embed_and_refuse_to_predict") else {
        return;
    };
    let r = reference(&shared);
    let mut o = options(&shared);
    o.models = vec![
        ModelSpec::parse(
            &format!(
                "mim={}",
                shared.join("fixtures/eva_x_ti_mim_fp16.pt").display()
            ),
            PredictorOptions::default(),
        )
        .unwrap(),
    ];
    let server = Server::start(o).unwrap();
    let c = Client::new(server.addr());
    runtime().block_on(async {
        let v: Value = c.get("/v1/models").await.json().await.unwrap();
        assert!(v["models"][0]["labels"].is_null(), "{v}");
        let png = image(&shared, "00000001_000.png");
        let v: Value = c
            .post("/v1/models/mim/embed", png.clone())
            .await
            .json()
            .await
            .unwrap();
        let d = max_diff(
            &floats(&v["pooled"]),
            &reference_row(&r["ti_mim/pooled"], 0),
        );
        eprintln!("MIM embed: pooled max abs diff {d:.2e} (tolerance 1e-4)");
        assert!(d <= 1e-4, "{d}");
        for path in ["/v1/models/mim/predict", "/v1/models/mim/cam"] {
            assert_eq!(
                error_code(c.post(path, png.clone()).await, 400).await,
                "no_head"
            );
        }
    });
    server.shutdown().unwrap();
}
