"""Pix2Cap-style annotation of new images: caption every panoptic segment with an OpenAI-compatible VLM.

Pix2Cap-COCO was made by outlining and numbering each segment of an image (Set-of-Mark prompting) and
asking GPT-4V for one instance-specific description per number; a subset was checked by people. This
package does the same for any COCO-panoptic dataset and any OpenAI-compatible chat-completions server:

- :mod:`.marks`   draws the numbered outlines;
- :mod:`.prompt`  the instructions and the strict ``<number>: <description>`` reply parser;
- :mod:`.client`  one request with its image, and the re-ask for missing numbers;
- :mod:`.cache`   the per-request reply cache that makes runs resumable;
- :mod:`.run`     the command line, the thread pool, the Pix2Cap JSON and the summary;
- :mod:`.review`  sampled HTML review sheets and folding decisions back into the JSON.

    python -m data_converters.annotate --images DIR --panoptic-json F --panoptic-dir DIR --out pix2cap_new.json \\
        --base-url URL --model NAME
    python -m data_converters.annotate review --in pix2cap_new.json --sample 200 --out review/
    python -m data_converters.annotate review --in pix2cap_new.json --decisions review/decisions.txt --out reviewed.json
"""
