//! Results a PACS can store, for a DICOM input: a Secondary Capture image of the Grad-CAM
//! overlay and an Enhanced Structured Report of the findings and probabilities. Both belong to
//! the source's study (its Study Instance UID and patient / study attributes copied), each in a
//! new series with new UIDs, and reference the source image.

use std::path::Path;

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

use super::DicomFile;
use crate::explain::overlay::Rgb;

/// Secondary Capture Image Storage.
pub const SECONDARY_CAPTURE: &str = "1.2.840.10008.5.1.4.1.1.7";
/// Enhanced SR Storage.
pub const ENHANCED_SR: &str = "1.2.840.10008.5.1.4.1.1.88.22";
/// The coding scheme of evax's own concept codes (a private scheme, as DICOM allows).
const SCHEME: &str = "99EVAX";

/// One class's result for the report.
#[derive(Debug, Clone)]
pub struct ClassResult {
    /// Class name.
    pub name: String,
    /// Probability under the label set's activation.
    pub probability: f32,
    /// Whether it is reported as a finding (at or above the threshold).
    pub finding: bool,
}

impl ClassResult {
    /// One result per class: its probability, and whether it reaches `threshold`.
    pub fn list(classes: &[String], probabilities: &[f32], threshold: f32) -> Vec<ClassResult> {
        classes
            .iter()
            .zip(probabilities)
            .map(|(n, &p)| ClassResult {
                name: n.clone(),
                probability: p,
                finding: p >= threshold,
            })
            .collect()
    }
}

/// What produced the results.
#[derive(Debug, Clone)]
pub struct Producer {
    /// The model's name (`EVA-X-S`).
    pub model: String,
    /// The checkpoint file's name and content hash.
    pub checkpoint: String,
    /// The threshold of findings.
    pub threshold: f32,
}

/// A new UID under the UUID-derived root `2.25` (ITU-T X.667), from the time, the process,
/// a counter and `salt`.
pub fn new_uid(salt: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    let feed = |h: &mut u128, b: u8| {
        *h ^= b as u128;
        *h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013B);
    };
    for b in nanos
        .to_le_bytes()
        .into_iter()
        .chain(std::process::id().to_le_bytes())
        .chain(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes())
        .chain(salt.bytes())
    {
        feed(&mut h, b);
    }
    // A UUID's 122 random bits, as a decimal integer (at most 37 digits: the UID fits 64).
    format!("2.25.{}", h >> 6)
}

fn text(obj: &mut InMemDicomObject, tag: Tag, vr: VR, v: impl Into<String>) {
    obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v.into())));
}

fn code(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    let mut c = InMemDicomObject::new_empty();
    text(&mut c, tags::CODE_VALUE, VR::SH, value);
    text(&mut c, tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme);
    text(&mut c, tags::CODE_MEANING, VR::LO, meaning);
    c
}

fn sequence(obj: &mut InMemDicomObject, tag: Tag, items: Vec<InMemDicomObject>) {
    obj.put(DataElement::new(tag, VR::SQ, DataSetSequence::from(items)));
}

/// The attributes both results share: patient and study copied from the source, a new series,
/// SOP class and instance, dates, equipment, and the reference to the source image.
fn common(
    source: &DicomFile,
    sop_class: &str,
    modality: &str,
    series_number: &str,
) -> InMemDicomObject {
    let src = source.object();
    let mut obj = InMemDicomObject::new_empty();
    for tag in [
        tags::PATIENT_NAME,
        tags::PATIENT_ID,
        tags::PATIENT_BIRTH_DATE,
        tags::PATIENT_SEX,
        tags::STUDY_INSTANCE_UID,
        tags::STUDY_DATE,
        tags::STUDY_TIME,
        tags::STUDY_ID,
        tags::ACCESSION_NUMBER,
        tags::REFERRING_PHYSICIAN_NAME,
        tags::STUDY_DESCRIPTION,
    ] {
        if let Ok(e) = src.element(tag) {
            obj.put(e.clone());
        }
    }
    // Type 2 attributes of the patient and study modules: present, empty when unknown.
    for (tag, vr) in [
        (tags::PATIENT_NAME, VR::PN),
        (tags::PATIENT_ID, VR::LO),
        (tags::PATIENT_BIRTH_DATE, VR::DA),
        (tags::PATIENT_SEX, VR::CS),
        (tags::STUDY_DATE, VR::DA),
        (tags::STUDY_TIME, VR::TM),
        (tags::STUDY_ID, VR::SH),
        (tags::ACCESSION_NUMBER, VR::SH),
        (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
    ] {
        if obj.element(tag).is_err() {
            text(&mut obj, tag, vr, "");
        }
    }
    if obj.element(tags::STUDY_INSTANCE_UID).is_err() {
        text(&mut obj, tags::STUDY_INSTANCE_UID, VR::UI, new_uid("study"));
    }
    let (date, time) = now();
    text(&mut obj, tags::SOP_CLASS_UID, VR::UI, sop_class);
    text(&mut obj, tags::SOP_INSTANCE_UID, VR::UI, new_uid(sop_class));
    text(
        &mut obj,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        new_uid("series"),
    );
    text(&mut obj, tags::MODALITY, VR::CS, modality);
    text(&mut obj, tags::SERIES_NUMBER, VR::IS, series_number);
    text(&mut obj, tags::INSTANCE_NUMBER, VR::IS, "1");
    text(&mut obj, tags::CONTENT_DATE, VR::DA, date.clone());
    text(&mut obj, tags::CONTENT_TIME, VR::TM, time.clone());
    text(&mut obj, tags::INSTANCE_CREATION_DATE, VR::DA, date);
    text(&mut obj, tags::INSTANCE_CREATION_TIME, VR::TM, time);
    text(&mut obj, tags::MANUFACTURER, VR::LO, "evax");
    text(
        &mut obj,
        tags::SOFTWARE_VERSIONS,
        VR::LO,
        env!("CARGO_PKG_VERSION"),
    );
    obj
}

/// The source image as a referenced SOP item (class and instance UIDs).
fn source_reference(source: &DicomFile) -> InMemDicomObject {
    let src = source.object();
    let mut item = InMemDicomObject::new_empty();
    let uid = |tag: Tag| {
        src.element(tag)
            .ok()
            .and_then(|e| {
                e.to_str()
                    .ok()
                    .map(|s| s.trim_end_matches('\0').to_string())
            })
            .unwrap_or_default()
    };
    text(
        &mut item,
        tags::REFERENCED_SOP_CLASS_UID,
        VR::UI,
        uid(tags::SOP_CLASS_UID),
    );
    text(
        &mut item,
        tags::REFERENCED_SOP_INSTANCE_UID,
        VR::UI,
        uid(tags::SOP_INSTANCE_UID),
    );
    item
}

/// Today's date and time, `YYYYMMDD` and `HHMMSS` (UTC).
fn now() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let t = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        format!("{y:04}{m:02}{d:02}"),
        format!("{:02}{:02}{:02}", t / 3600, t % 3600 / 60, t % 60),
    )
}

/// The object as a DICOM file (explicit VR little endian) in memory.
fn encode(obj: InMemDicomObject, sop_class: &str) -> crate::Result<Vec<u8>> {
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .media_storage_sop_class_uid(sop_class)
                .transfer_syntax("1.2.840.10008.1.2.1")
                .implementation_class_uid("2.25.137038125948464847900039011591283709926")
                .implementation_version_name("EVAX"),
        )
        .map_err(|e| crate::Error::Invalid(format!("DICOM result: {e}")))?;
    let mut bytes = Vec::new();
    file.write_all(&mut bytes)
        .map_err(|e| crate::Error::Invalid(format!("DICOM result: {e}")))?;
    Ok(bytes)
}

/// Write an encoded result (from [`secondary_capture_bytes`] or [`report_bytes`]) to `path`
/// atomically; an encoding error is reported with the path.
pub fn write(bytes: crate::Result<Vec<u8>>, path: &Path) -> crate::Result<()> {
    let bytes = bytes.map_err(|e| crate::Error::Invalid(format!("{}: {e}", path.display())))?;
    crate::io::write_atomic(path, &bytes).map_err(|e| crate::Error::io(path, e))
}

/// The overlay `pic` as a Secondary Capture image of the source's study, encoded.
pub fn secondary_capture_bytes(
    source: &DicomFile,
    pic: &Rgb,
    description: &str,
) -> crate::Result<Vec<u8>> {
    let mut obj = common(source, SECONDARY_CAPTURE, "OT", "9001");
    text(
        &mut obj,
        tags::SERIES_DESCRIPTION,
        VR::LO,
        "evax Grad-CAM overlay",
    );
    text(&mut obj, tags::CONVERSION_TYPE, VR::CS, "WSD");
    text(&mut obj, tags::IMAGE_TYPE, VR::CS, "DERIVED\\SECONDARY");
    text(&mut obj, tags::DERIVATION_DESCRIPTION, VR::ST, description);
    text(&mut obj, tags::BURNED_IN_ANNOTATION, VR::CS, "YES");
    text(&mut obj, tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "RGB");
    for (tag, v) in [
        (tags::SAMPLES_PER_PIXEL, 3u16),
        (tags::PLANAR_CONFIGURATION, 0),
        (tags::ROWS, pic.height as u16),
        (tags::COLUMNS, pic.width as u16),
        (tags::BITS_ALLOCATED, 8),
        (tags::BITS_STORED, 8),
        (tags::HIGH_BIT, 7),
        (tags::PIXEL_REPRESENTATION, 0),
    ] {
        obj.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
    }
    if pic.width > u16::MAX as usize || pic.height > u16::MAX as usize {
        return Err(crate::Error::Invalid(format!(
            "an overlay of {}x{} does not fit a DICOM image",
            pic.width, pic.height
        )));
    }
    let mut data = pic.data.clone();
    if data.len() % 2 == 1 {
        data.push(0);
    }
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::from(data),
    ));
    sequence(
        &mut obj,
        tags::SOURCE_IMAGE_SEQUENCE,
        vec![source_reference(source)],
    );
    encode(obj, SECONDARY_CAPTURE)
}

/// The findings and probabilities as an Enhanced SR of the source's study, encoded: a
/// container "EVA-X classification" holding the model, the checkpoint, the threshold, one
/// numeric item per class (probability) and the findings as text, with the source image as
/// evidence.
pub fn report_bytes(
    source: &DicomFile,
    producer: &Producer,
    classes: &[ClassResult],
) -> crate::Result<Vec<u8>> {
    let mut obj = common(source, ENHANCED_SR, "SR", "9002");
    text(
        &mut obj,
        tags::SERIES_DESCRIPTION,
        VR::LO,
        "evax classification report",
    );
    text(&mut obj, tags::VALUE_TYPE, VR::CS, "CONTAINER");
    text(&mut obj, tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE");
    text(&mut obj, tags::COMPLETION_FLAG, VR::CS, "COMPLETE");
    text(&mut obj, tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED");
    sequence(
        &mut obj,
        tags::CONCEPT_NAME_CODE_SEQUENCE,
        vec![code("report", SCHEME, "EVA-X classification")],
    );
    let item = |concept: InMemDicomObject, value_type: &str| {
        let mut it = InMemDicomObject::new_empty();
        text(&mut it, tags::RELATIONSHIP_TYPE, VR::CS, "CONTAINS");
        text(&mut it, tags::VALUE_TYPE, VR::CS, value_type);
        sequence(&mut it, tags::CONCEPT_NAME_CODE_SEQUENCE, vec![concept]);
        it
    };
    let text_item = |name: &str, meaning: &str, value: String| {
        let mut it = item(code(name, SCHEME, meaning), "TEXT");
        text(&mut it, tags::TEXT_VALUE, VR::UT, value);
        it
    };
    let mut content = vec![
        text_item("model", "Model", producer.model.clone()),
        text_item("checkpoint", "Checkpoint", producer.checkpoint.clone()),
        text_item(
            "software",
            "Software",
            format!("evax {}", env!("CARGO_PKG_VERSION")),
        ),
        text_item(
            "threshold",
            "Finding threshold",
            format!("{}", producer.threshold),
        ),
    ];
    for c in classes {
        let mut it = item(code(&c.name, SCHEME, &c.name), "NUM");
        let mut measured = InMemDicomObject::new_empty();
        text(
            &mut measured,
            tags::NUMERIC_VALUE,
            VR::DS,
            format!("{:.6}", c.probability),
        );
        sequence(
            &mut measured,
            tags::MEASUREMENT_UNITS_CODE_SEQUENCE,
            vec![code("1", "UCUM", "probability")],
        );
        sequence(&mut it, tags::MEASURED_VALUE_SEQUENCE, vec![measured]);
        content.push(it);
    }
    let findings: Vec<&str> = classes
        .iter()
        .filter(|c| c.finding)
        .map(|c| c.name.as_str())
        .collect();
    content.push(text_item(
        "findings",
        "Findings",
        if findings.is_empty() {
            "none".into()
        } else {
            findings.join(", ")
        },
    ));
    sequence(&mut obj, tags::CONTENT_SEQUENCE, content);
    // The source image as evidence, by study, series and instance.
    let src = source.object();
    let uid = |tag: Tag| {
        src.element(tag)
            .ok()
            .and_then(|e| {
                e.to_str()
                    .ok()
                    .map(|s| s.trim_end_matches('\0').to_string())
            })
            .unwrap_or_default()
    };
    let mut series = InMemDicomObject::new_empty();
    text(
        &mut series,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        uid(tags::SERIES_INSTANCE_UID),
    );
    sequence(
        &mut series,
        tags::REFERENCED_SOP_SEQUENCE,
        vec![source_reference(source)],
    );
    let mut study = InMemDicomObject::new_empty();
    text(&mut study, tags::STUDY_INSTANCE_UID, VR::UI, {
        let s = uid(tags::STUDY_INSTANCE_UID);
        if s.is_empty() {
            obj.element(tags::STUDY_INSTANCE_UID)
                .ok()
                .and_then(|e| e.to_str().ok().map(|s| s.to_string()))
                .unwrap_or_default()
        } else {
            s
        }
    });
    sequence(&mut study, tags::REFERENCED_SERIES_SEQUENCE, vec![series]);
    sequence(
        &mut obj,
        tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
        vec![study],
    );
    encode(obj, ENHANCED_SR)
}

/// A Structured Report read back: identity, and its content items as name and value.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReportSummary {
    /// SOP Class UID.
    pub sop_class: String,
    /// SOP Instance UID.
    pub sop_instance: String,
    /// Study Instance UID.
    pub study: String,
    /// Series Instance UID.
    pub series: String,
    /// Patient ID.
    pub patient_id: String,
    /// The document's title (concept name).
    pub title: String,
    /// Completion and verification flags.
    pub flags: String,
    /// Content items: concept name, value (text, or number with units).
    pub items: Vec<(String, String)>,
    /// Referenced evidence (SOP Instance UIDs).
    pub evidence: Vec<String>,
}

/// Read `path` as a Structured Report; `None` for any other kind of DICOM object.
pub fn read_report(path: &Path) -> crate::Result<Option<ReportSummary>> {
    let bytes = std::fs::read(path).map_err(|e| crate::Error::io(path, e))?;
    let obj = super::parse(&bytes)
        .map_err(|e| crate::Error::Invalid(format!("{}: {e}", path.display())))?;
    let s = |o: &InMemDicomObject, tag: Tag| {
        o.element(tag)
            .ok()
            .and_then(|e| {
                e.to_str()
                    .ok()
                    .map(|v| v.trim_end_matches(['\0', ' ']).to_string())
            })
            .unwrap_or_default()
    };
    let sop_class = s(&obj, tags::SOP_CLASS_UID);
    if !sop_class.starts_with("1.2.840.10008.5.1.4.1.1.88.") {
        return Ok(None);
    }
    let items_of = |o: &InMemDicomObject, tag: Tag| -> Vec<InMemDicomObject> {
        o.element(tag)
            .ok()
            .and_then(|e| e.items().map(|i| i.to_vec()))
            .unwrap_or_default()
    };
    let meaning = |o: &InMemDicomObject| {
        items_of(o, tags::CONCEPT_NAME_CODE_SEQUENCE)
            .first()
            .map(|c| s(c, tags::CODE_MEANING))
            .unwrap_or_default()
    };
    let items = items_of(&obj, tags::CONTENT_SEQUENCE)
        .iter()
        .map(|it| {
            let value = match s(it, tags::VALUE_TYPE).as_str() {
                "NUM" => items_of(it, tags::MEASURED_VALUE_SEQUENCE)
                    .first()
                    .map(|m| {
                        let units = items_of(m, tags::MEASUREMENT_UNITS_CODE_SEQUENCE)
                            .first()
                            .map(|u| s(u, tags::CODE_MEANING))
                            .unwrap_or_default();
                        format!("{} ({units})", s(m, tags::NUMERIC_VALUE))
                    })
                    .unwrap_or_default(),
                "TEXT" => s(it, tags::TEXT_VALUE),
                other => format!("({other})"),
            };
            (meaning(it), value)
        })
        .collect();
    let evidence = items_of(&obj, tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE)
        .iter()
        .flat_map(|st| items_of(st, tags::REFERENCED_SERIES_SEQUENCE))
        .flat_map(|se| items_of(&se, tags::REFERENCED_SOP_SEQUENCE))
        .map(|r| s(&r, tags::REFERENCED_SOP_INSTANCE_UID))
        .collect();
    Ok(Some(ReportSummary {
        sop_instance: s(&obj, tags::SOP_INSTANCE_UID),
        study: s(&obj, tags::STUDY_INSTANCE_UID),
        series: s(&obj, tags::SERIES_INSTANCE_UID),
        patient_id: s(&obj, tags::PATIENT_ID),
        title: meaning(&obj),
        flags: format!(
            "{}, {}",
            s(&obj, tags::COMPLETION_FLAG),
            s(&obj, tags::VERIFICATION_FLAG)
        ),
        items,
        evidence,
        sop_class,
    }))
}

/// A report as `evax dicom info` prints it.
pub fn report_text(path: &Path, r: &ReportSummary) -> String {
    let mut out = String::new();
    w!(out, "file            {}", path.display());
    w!(out, "structured report {} ({})", r.title, r.sop_class);
    w!(out, "patient         {}", r.patient_id);
    w!(out, "study           {}", r.study);
    w!(out, "series          {}", r.series);
    w!(out, "instance        {}", r.sop_instance);
    w!(out, "flags           {}", r.flags);
    for (name, value) in &r.items {
        w!(out, "  {name}: {value}");
    }
    w!(out, "evidence        {}", r.evidence.join(", "));
    out
}
