"""Make the JPEG-LS DICOM test files of tests/dicom.rs with an independent encoder (CharLS, through
pydicom's pyjpegls plugin) and record what pydicom decodes from them (float32 .npy, exact for these
integer values). Run once; the outputs are committed:

    pip install numpy pydicom pyjpegls
    python scripts/make-jpegls-testdata.py tests/data/jpegls

Images: odd sizes, smooth gradients, noise, flat areas (run mode) and sharp edges (run
interruptions), at 8 and 12/16 bits, lossless and near-lossless (NEAR 2 and 3); uniform noise
(escape codes)."""
import sys
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEGLSLossless, JPEGLSNearLossless, ExplicitVRLittleEndian, generate_uid

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)


def image(rows, cols, bits, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    top = (1 << bits) - 1
    v = (x / cols * 0.6 + y / rows * 0.3) * top
    v += rng.normal(0, top * 0.01, (rows, cols))
    v[rows // 3: rows // 2, :] = top // 3  # a flat band: run mode
    v[:, cols // 2: cols // 2 + 3] = top  # a bright stripe: run interruptions
    v[5:9, 5:40] = 0
    return np.clip(np.rint(v), 0, top).astype(np.uint8 if bits <= 8 else np.uint16)


def write(name, arr, bits_stored, syntax, near=None):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "JLS-TEST"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8 if arr.dtype == np.uint8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = arr.tobytes()
    kwargs = {"encoding_plugin": "pyjpegls"}
    if near is not None:
        kwargs["jls_error"] = near
    ds.compress(syntax, arr, **kwargs)
    ds.save_as(out / f"{name}.dcm", enforce_file_format=True)
    back = pydicom.dcmread(out / f"{name}.dcm")
    assert back.file_meta.TransferSyntaxUID == syntax
    decoded = back.pixel_array
    if near is None:
        assert np.array_equal(decoded, arr), name
    else:
        assert np.abs(decoded.astype(int) - arr.astype(int)).max() <= near, name
    np.save(out / f"{name}.npy", decoded.astype(np.float32))
    print(name, arr.shape, bits_stored, syntax.name, "near", near, (out / f"{name}.dcm").stat().st_size, "bytes")


write("lossless8", image(45, 67, 8, 1), 8, JPEGLSLossless)
write("near8", image(45, 67, 8, 2), 8, JPEGLSNearLossless, near=2)
write("lossless12", image(53, 61, 12, 3), 12, JPEGLSLossless)
write("lossless16", image(40, 71, 16, 4), 16, JPEGLSLossless)
write("near16", image(40, 71, 16, 5), 16, JPEGLSNearLossless, near=3)
# Uniform noise: long Golomb codes and their escape (the LIMIT rule) in every context.
noise = np.random.default_rng(6)
write("noise8", noise.integers(0, 256, (31, 37)).astype(np.uint8), 8, JPEGLSLossless)
write("noise16", noise.integers(0, 65536, (29, 33)).astype(np.uint16), 16, JPEGLSLossless)
