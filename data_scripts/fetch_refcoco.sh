#!/usr/bin/env bash
# Download RefCOCO, RefCOCO+, RefCOCOg (REFER annotations) and COCO train2014 images, lay them out as
# ppcr.data.refer expects, and convert the refs pickles to JSON with `ppcr convert-refs` (safe loader).
#
#   usage: data_scripts/fetch_refcoco.sh [ROOT]        (ROOT defaults to ./data/refer)
#
# Environment:
#   REFER_BASE_URL   where refcoco.zip, refcoco+.zip, refcocog.zip live
#                    (default: the REFER project's server, http://bvisionweb1.cs.unc.edu/licheng/referit/data;
#                    if it is down, point this at a mirror holding the same three zips)
#   COCO_URL         COCO 2014 train images zip (default: http://images.cocodataset.org/zips/train2014.zip)
#   SKIP_IMAGES=1    only fetch the annotations (~13 GB less)
#   PPCR             the ppcr command (default: `ppcr`, falls back to `python -m ppcr.cli`)
#
# Needs: curl (or wget), unzip, ~35 GB free disk during unpacking (~15 GB after the zips are removed).
set -euo pipefail

ROOT="${1:-data/refer}"
REFER_BASE_URL="${REFER_BASE_URL:-http://bvisionweb1.cs.unc.edu/licheng/referit/data}"
COCO_URL="${COCO_URL:-http://images.cocodataset.org/zips/train2014.zip}"
if [[ -z "${PPCR:-}" ]]; then
    if command -v ppcr >/dev/null 2>&1; then PPCR="ppcr"; else PPCR="python -m ppcr.cli"; fi
fi

mkdir -p "$ROOT/downloads" "$ROOT/images/mscoco/images"

fetch() {  # fetch URL DEST: resumable download, skipped when DEST exists and is complete
    local url="$1" dest="$2"
    if [[ -s "$dest" ]] && unzip -tq "$dest" >/dev/null 2>&1; then
        echo "have $dest"; return
    fi
    echo "downloading $url"
    if command -v curl >/dev/null 2>&1; then
        curl -fL --retry 5 -C - -o "$dest" "$url"
    else
        wget -c -O "$dest" "$url"
    fi
    unzip -tq "$dest" >/dev/null || { echo "corrupt download: $dest" >&2; exit 1; }
}

# 1) annotations: each zip holds one folder <dataset>/ with instances.json and refs(<splitBy>).p
for ds in refcoco refcoco+ refcocog; do
    fetch "$REFER_BASE_URL/$ds.zip" "$ROOT/downloads/$ds.zip"
    unzip -oq "$ROOT/downloads/$ds.zip" -d "$ROOT"
    test -f "$ROOT/$ds/instances.json" || { echo "unexpected layout in $ds.zip: no $ds/instances.json" >&2; exit 1; }
done

# 2) images: COCO train2014 (82,783 JPEGs, ~13 GB) -> images/mscoco/images/train2014/
if [[ "${SKIP_IMAGES:-0}" != "1" ]]; then
    if [[ -d "$ROOT/images/mscoco/images/train2014" ]] && \
       [[ $(find "$ROOT/images/mscoco/images/train2014" -name '*.jpg' | head -n 82783 | wc -l) -eq 82783 ]]; then
        echo "have COCO train2014 images"
    else
        fetch "$COCO_URL" "$ROOT/downloads/train2014.zip"
        unzip -oq "$ROOT/downloads/train2014.zip" -d "$ROOT/images/mscoco/images"
    fi
fi

# 3) refs(<splitBy>).p -> refs(<splitBy>).json (restricted unpickler: refuses any code in the pickle)
for pair in refcoco:unc refcoco:google refcoco+:unc refcocog:umd refcocog:google; do
    ds="${pair%%:*}"; by="${pair##*:}"
    if [[ -f "$ROOT/$ds/refs($by).p" ]]; then
        $PPCR convert-refs --root "$ROOT" --dataset "$ds" --split-by "$by"
    fi
done

echo "done. Remove $ROOT/downloads to reclaim ~13 GB. Data root: $ROOT"
