"""Make the 12-bit JPEG Extended DICOM test files of tests/dicom.rs with an independent encoder
(libjpeg-turbo 3, through imagecodecs) and record what pydicom decodes from them (float32 .npy,
exact for these integer values). pydicom decodes this transfer syntax with pylibjpeg-libjpeg (its
GDCM plugin refuses 12-bit JPEG Extended). Run once; the outputs are committed:

    pip install numpy pydicom imagecodecs pylibjpeg pylibjpeg-libjpeg
    python scripts/make-jpeg12-testdata.py tests/data/jpeg12

Images: odd sizes (partial blocks), smooth gradients, noise, hard edges that overshoot the
sample range (clamping), quality 100 (quantiser 1), 90, 50 and 5 (16-bit quantisation tables)."""
import sys
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGExtended12Bit, generate_uid

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)


def image(rows, cols, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    v = 400 + 2800 * (x / cols) * (0.6 + 0.4 * np.sin(y / rows * 3.1))
    v += rng.normal(0, 40, (rows, cols))
    v[(x - cols / 2) ** 2 + (y - rows / 2) ** 2 < (min(rows, cols) / 4) ** 2] = 3900
    v[3:7, 2:30] = 0
    return np.clip(np.rint(v), 0, 4095).astype(np.uint16)


def write(name, arr, quality):
    stream = imagecodecs.jpeg8_encode(arr, level=quality, bitspersample=12)
    assert stream[:2] == b"\xff\xd8"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = JPEGExtended12Bit
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = "JPEG12-TEST"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    ds.save_as(out / f"{name}.dcm", enforce_file_format=True)
    back = pydicom.dcmread(out / f"{name}.dcm")
    assert back.file_meta.TransferSyntaxUID == JPEGExtended12Bit
    decoded = back.pixel_array
    turbo = imagecodecs.jpeg8_decode(stream)
    print(name, arr.shape, "quality", quality, len(stream), "bytes;",
          "max |error|", int(np.abs(decoded.astype(int) - arr).max()), ";",
          "pixels where libjpeg-turbo differs from pydicom:", int((turbo != decoded).sum()))
    np.save(out / f"{name}.npy", decoded.astype(np.float32))


write("q90", image(48, 64, 1), 90)
write("q50_odd", image(37, 53, 2), 50)
write("q100_odd", image(29, 45, 3), 100)
write("q5", image(40, 40, 4), 5)
noise = np.random.default_rng(5).integers(0, 4096, (27, 35)).astype(np.uint16)
write("noise_q75", noise, 75)
# Hard 0 / 4095 edges: ringing past both ends of the range, which the decoder clamps.
checker = ((np.indices((32, 40)).sum(axis=0) // 3) % 2 * 4095).astype(np.uint16)
write("edges_q60", checker, 60)
