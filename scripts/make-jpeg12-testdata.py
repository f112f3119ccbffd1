"""Make the 12-bit JPEG Extended DICOM test files of tests/dicom.rs with an independent encoder
(libjpeg-turbo 3, through imagecodecs) and record what pydicom decodes from them (float32 .npy,
exact for these integer values). pydicom decodes this transfer syntax with pylibjpeg-libjpeg (its
GDCM plugin refuses 12-bit JPEG Extended). Run once; the outputs are committed:

    pip install numpy pydicom imagecodecs pylibjpeg pylibjpeg-libjpeg
    python scripts/make-jpeg12-testdata.py tests/data/jpeg12

Images: odd sizes (partial blocks), smooth gradients, noise, hard edges that overshoot the
sample range (clamping), quality 100 (quantiser 1), 90, 50 and 5 (16-bit quantisation tables),
and one stream re-encoded with restart markers (which the library's Python binding cannot
write) and different Huffman tables."""
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


ZIGZAG = [0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34,
          27, 20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44,
          51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63]


def segments(stream):
    """(marker, payload) up to SOS, then the entropy-coded data and the rest."""
    pos, out = 2, []
    while True:
        marker = stream[pos + 1]
        length = int.from_bytes(stream[pos + 2:pos + 4], "big")
        out.append((marker, stream[pos + 4:pos + 2 + length]))
        pos += 2 + length
        if marker == 0xDA:
            end = pos
            while not (stream[end] == 0xFF and stream[end + 1] not in (0x00,) + tuple(range(0xD0, 0xD8))):
                end += 1
            return out, stream[pos:end], stream[end:]


def huffman_codes(payload):
    """{(class, id): {code (str of bits): symbol}} of one DHT payload."""
    tables, p = {}, 0
    while p < len(payload):
        tc, th = payload[p] >> 4, payload[p] & 15
        counts = payload[p + 1:p + 17]
        symbols = payload[p + 17:p + 17 + sum(counts)]
        codes, code, k = {}, 0, 0
        for length, n in enumerate(counts, 1):
            for _ in range(n):
                codes[format(code, f"0{length}b")] = symbols[k]
                code, k = code + 1, k + 1
            code <<= 1
        tables[(tc, th)] = codes
        p += 17 + sum(counts)
    return tables


def with_restarts(stream, interval):
    """The same coefficients re-encoded with a restart marker every `interval` blocks and flat
    Huffman tables of our own (every DC category at 5 bits, every AC symbol at 8): a
    restart-interval test stream the JPEG library cannot make."""
    segs, data, rest = segments(stream)
    tables = {}
    for m, payload in segs:
        if m == 0xC4:
            tables.update(huffman_codes(payload))
        if m in (0xC0, 0xC1):
            rows, cols = int.from_bytes(payload[1:3], "big"), int.from_bytes(payload[3:5], "big")
        if m == 0xDA:
            td, ta = payload[2] >> 4, payload[2] & 15
    bits = "".join(format(b, "08b") for b in data.replace(b"\xff\x00", b"\xff"))
    pos = 0

    def symbol(codes):
        nonlocal pos
        for n in range(1, 17):
            if bits[pos:pos + n] in codes:
                s = codes[bits[pos:pos + n]]
                pos += n
                return s
        raise ValueError("bad code")

    def value(size):
        nonlocal pos
        if size == 0:
            return 0
        v = int(bits[pos:pos + size], 2)
        pos += size
        return v if v >= 1 << (size - 1) else v - (1 << size) + 1

    blocks, dc = [], 0
    for _ in range(((rows + 7) // 8) * ((cols + 7) // 8)):
        coef = [0] * 64
        dc += value(symbol(tables[(0, td)]))
        coef[0] = dc
        k = 1
        while k < 64:
            rs = symbol(tables[(1, ta)])
            r, s = rs >> 4, rs & 15
            if s == 0:
                if r == 15:
                    k += 16
                    continue
                break
            k += r
            coef[k] = value(s)
            k += 1
        blocks.append(coef)
    dc_syms = list(range(16))
    ac_syms = sorted({0x00, 0xF0} | {(r << 4) | s for r in range(16) for s in range(1, 15)})
    dc_code = {s: format(i, "05b") for i, s in enumerate(dc_syms)}
    ac_code = {s: format(i, "08b") for i, s in enumerate(ac_syms)}

    def amplitude(v):
        size = abs(v).bit_length()
        return size, (format(v if v > 0 else v + (1 << size) - 1, f"0{size}b") if size else "")

    out, acc, pred = bytearray(), [], 0

    def flush():
        nonlocal acc
        b = "".join(acc)
        b += "1" * (-len(b) % 8)
        for i in range(0, len(b), 8):
            byte = int(b[i:i + 8], 2)
            out.append(byte)
            if byte == 0xFF:
                out.append(0)
        acc = []

    for i, coef in enumerate(blocks):
        if i and i % interval == 0:
            flush()
            out += bytes([0xFF, 0xD0 + (i // interval - 1) % 8])
            pred = 0
        size, a = amplitude(coef[0] - pred)
        pred = coef[0]
        acc += [dc_code[size], a]
        run = 0
        for k in range(1, 64):
            v = coef[k]
            if v == 0:
                run += 1
                continue
            while run > 15:
                acc.append(ac_code[0xF0])
                run -= 16
            size, a = amplitude(v)
            acc += [ac_code[(run << 4) | size], a]
            run = 0
        if run:
            acc.append(ac_code[0x00])
    flush()

    def seg(marker, payload):
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    def dht(tc, th, syms, length):
        counts = [0] * 16
        counts[length - 1] = len(syms)
        return seg(0xC4, bytes([(tc << 4) | th] + counts + syms))

    head = b"\xff\xd8"
    for m, payload in segs:
        if m == 0xC4:
            continue
        if m == 0xDA:
            head += seg(0xDD, interval.to_bytes(2, "big"))
            head += dht(0, td, dc_syms, 5) + dht(1, ta, ac_syms, 8)
        head += seg(m, payload)
    return head + bytes(out) + rest


def write(name, arr, quality, restart=None):
    stream = imagecodecs.jpeg8_encode(arr, level=quality, bitspersample=12)
    assert stream[:2] == b"\xff\xd8"
    if restart:
        stream = with_restarts(stream, restart)
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
# Restart markers (RST0..7 cycling) every 5 blocks, re-encoded with our own Huffman tables.
write("restart5_q80", image(56, 72, 6), 80, restart=5)
