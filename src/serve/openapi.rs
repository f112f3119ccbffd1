//! The server's OpenAPI 3.0 description, served at `/openapi.json`.

use serde_json::{Value, json};

/// The OpenAPI document of every endpoint; `secured`: the server requires a bearer token (on
/// `/v1/*` and `/metrics`).
pub fn document(secured: bool) -> Value {
    let image_body = json!({
        "required": true,
        "description": "One PNG, JPEG or DICOM image, recognised by its content (the \
                        Content-Type header is not consulted).",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    });
    let name = json!({
        "name": "name", "in": "path", "required": true,
        "description": "A served model (see GET /v1/models).",
        "schema": {"type": "string"}
    });
    let cam = |required_default: &str| {
        json!({
            "name": "cam", "in": "query", "required": false,
            "description": format!("Grad-CAM target: 'top' (the highest-scoring class), a class \
                                    name or a class index. {required_default}"),
            "schema": {"type": "string"}
        })
    };
    let threshold = json!({
        "name": "threshold", "in": "query", "required": false,
        "description": "Probability at or above which a class is a finding (default: the \
                        server's --threshold).",
        "schema": {"type": "number"}
    });
    let errors = |codes: &[&str]| {
        let mut m = serde_json::Map::new();
        for c in codes {
            m.insert(
                (*c).to_string(),
                json!({"description": "An error (see the code).",
                       "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
            );
        }
        m
    };
    let compute_errors = [
        "400", "401", "404", "406", "413", "415", "422", "500", "503", "504",
    ];
    let with_errors = |ok: Value, codes: &[&str]| {
        let mut m = errors(codes);
        m.insert("200".into(), ok);
        Value::Object(m)
    };
    let mut doc = json!({
        "openapi": "3.0.3",
        "info": {
            "title": "evax inference server",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "EVA-X chest X-ray models: classification, Grad-CAM and embeddings. \
                            Concurrent requests are batched dynamically. Errors are JSON with a \
                            stable code; 503 answers carry Retry-After."
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {
                            "code": {"type": "string", "enum": [
                                "unauthorized", "unknown_model", "not_found", "bad_parameter",
                                "unknown_finding", "empty_body", "bad_body", "body_too_large",
                                "unsupported_type", "bad_image", "not_acceptable", "no_head",
                                "queue_full", "shutting_down", "timeout", "model_failed",
                                "internal"]},
                            "message": {"type": "string"}
                        }
                    }}
                },
                "Preprocessing": {"type": "object", "properties": {
                    "decoded_as": {"type": "string", "enum": ["png", "jpeg", "dicom"]},
                    "dicom_steps": {"type": "array", "items": {"type": "string"}},
                    "resize_shorter_side_to": {"type": "integer"},
                    "interpolation": {"type": "string"},
                    "center_crop": {"type": "array", "items": {"type": "integer"}},
                    "mean": {"type": "number"},
                    "std": {"type": "number"}
                }},
                "Prediction": {"type": "object", "properties": {
                    "model": {"type": "string"},
                    "architecture": {"type": "string"},
                    "checkpoint": {"type": "string"},
                    "checkpoint_sha256": {"type": "string"},
                    "preprocessing": {"$ref": "#/components/schemas/Preprocessing"},
                    "labels": {"type": "array", "items": {"type": "string"}},
                    "logits": {"type": "array", "items": {"type": "number"}},
                    "probabilities": {"type": "array", "items": {"type": "number"}},
                    "threshold": {"type": "number"},
                    "findings": {"type": "array", "items": {"type": "string"}},
                    "cam": {"type": "object", "description": "With ?cam=: the map [H][W] in [0, 1] \
                                                              on the model's input crop.",
                            "properties": {
                                "class": {"type": "string"},
                                "class_index": {"type": "integer"},
                                "probability": {"type": "number"},
                                "size": {"type": "array", "items": {"type": "integer"}},
                                "map": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}
                            }}
                }},
                "Embedding": {"type": "object", "properties": {
                    "model": {"type": "string"},
                    "checkpoint_sha256": {"type": "string"},
                    "dim": {"type": "integer"},
                    "pooled": {"type": "array", "items": {"type": "number"}}
                }}
            }
        },
        "paths": {
            "/healthz": {"get": {"summary": "The process is up.", "security": [],
                                  "responses": {"200": {"description": "ok"}}}},
            "/readyz": {"get": {"summary": "Models loaded and accepting requests.", "security": [],
                                 "responses": {"200": {"description": "ready"},
                                               "503": {"description": "shutting down"}}}},
            "/openapi.json": {"get": {"summary": "This document.", "security": [],
                                       "responses": {"200": {"description": "OpenAPI 3.0"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text format 0.0.4).",
                                  "responses": {"200": {"description": "metrics",
                                                        "content": {"text/plain": {}}},
                                                "401": {"description": "token required"}}}},
            "/v1/models": {"get": {"summary": "The served models.",
                                    "responses": {"200": {"description": "models",
                                                          "content": {"application/json": {}}},
                                                  "401": {"description": "token required"}}}},
            "/v1/models/{name}/predict": {"post": {
                "summary": "Classify one image; with ?cam= also its Grad-CAM. With Accept: \
                            application/dicom and a DICOM input: a Structured Report.",
                "parameters": [name, cam("Default: no CAM."), threshold],
                "requestBody": image_body,
                "responses": with_errors(json!({"description": "the prediction", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Prediction"}},
                    "application/dicom": {"schema": {"type": "string", "format": "binary"}}
                }}), &compute_errors)
            }},
            "/v1/models/{name}/cam": {"post": {
                "summary": "The Grad-CAM overlay on the whole image (PNG); with Accept: \
                            application/dicom and a DICOM input: a Secondary Capture image.",
                "parameters": [name, cam("Default: top."), threshold],
                "requestBody": image_body,
                "responses": with_errors(json!({"description": "the overlay", "content": {
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                    "application/dicom": {"schema": {"type": "string", "format": "binary"}}
                }}), &compute_errors)
            }},
            "/v1/models/{name}/embed": {"post": {
                "summary": "The pooled representation; ?format=npy or Accept: application/x-npy \
                            for a float32 [1, C] .npy.",
                "parameters": [name, {"name": "format", "in": "query", "required": false,
                                      "schema": {"type": "string", "enum": ["json", "npy"]}}],
                "requestBody": image_body,
                "responses": with_errors(json!({"description": "the embedding", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Embedding"}},
                    "application/x-npy": {"schema": {"type": "string", "format": "binary"}}
                }}), &compute_errors)
            }}
        }
    });
    if secured {
        doc["components"]["securitySchemes"] =
            json!({"bearer": {"type": "http", "scheme": "bearer"}});
        doc["security"] = json!([{"bearer": []}]);
    }
    doc
}
