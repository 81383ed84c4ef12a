"""About / how to read: what the views mean, with the paper's facts."""
import streamlit as st

st.title("About / how to read")
st.markdown("""
**What this shows.** Large Vision Transformers trained long enough (DINOv2, DeiT-III, OpenCLIP) recycle a few
low-information patch tokens, usually in uniform background, as scratch space for global computation.
Those tokens get about **10x the norm** of their neighbours, lose their local content (position, pixels),
carry global content (as much as CLS), and spoil attention maps and dense features. Adding a few learnable
**register** tokens after the patch embedding (discarded at the output) gives the model that scratch space and
removes the artifacts (Darcet, Oquab, Mairal, Bojanowski, *Vision Transformers Need Registers*, ICLR 2024).
DINOv2 with registers uses 4 of them; the token order is `[cls, registers…, patches]`.

**Norm maps.** The L2 norm of each patch token after a block, laid over the image. Outliers are outlined; hover
a cell for its row, column and norm. Norms are read on the residual stream, **before the final LayerNorm**
("pre-final-norm"); after it ("post-final-norm") every token has a similar norm and the outliers hide, which
is why reading `get_intermediate_layers(norm=True)` shows none. The register model is shown beside its twin.

**Norm histogram.** Outliers are the tokens in a separate **high mode** of a bimodal norm distribution: for
DINOv2 ViT-g the cut is about 150 and takes about 2% of tokens; for OpenCLIP ViT-B/16 it is about 30. The cut
is model-specific, so *auto* tests each candidate high mode against the bulk's own upper tail and finds none
when the norms are unimodal (as with registers, or with random weights); the caption says why for every
model (see docs/outliers.md). Click a bar to move the threshold there.

**Layer emergence.** Outliers appear in the **middle layers** (ViT-g: around layer 15 of 40) and stay; they
appear after about a third of training and mostly in ViT-L and larger; ViT-B shows weaker ones, often in the
top-left patches. The first layer with outliers is marked. Layers are 0-based block indices, as in the CLI.

**Attention.** What CLS and each register attend to. Without registers CLS puts a large share of its attention
on the few outlier tokens (compare with their share of the patches, dotted); with registers the maps become
clean and the registers take over the global role.

**Token embedding.** PCA (instant) or UMAP of the tokens of one layer: outliers gather apart from the local
patch tokens, close to CLS. Hover a point for its image and cell; click it to see the cell on the image.

**Good to know.** Outliers sit where neighbouring patches look alike (uniform background). Interpolating
position embeddings *without* antialiasing creates striped outlier patterns; with antialiasing they sit mostly
at image borders. The artifacts matter downstream: LOST object discovery (corLoc, VOC2007) drops from 61.9
with DINO to 35.3 with DINOv2 and recovers to 55.4 with registers.

**Weights.** *Pretrained* weights come from the local Hugging Face cache; offline, pre-fetch them on a connected
machine with `python -m vitlens fetch dinov2_vits14_reg4` (and `dinov2_vits14`) and copy `HF_HOME` here.
Without them the app shows the **synthetic demo (planted artifacts)**: *not a trained model*, but random weights
in which the model without registers turns the tokens at four fixed cells near the border into high-norm tokens
from its middle block on (the same cells at every input side and aspect, whatever the picture shows), while its twin with registers stays
clean. It shows what each view looks like when artifacts are there; attention and embeddings are those of random
weights. *Random weights* (no artifacts expected) are one click away in the sidebar, as are local weights files
from the folder named by `VITLENS_WEIGHTS_DIR`.

**Sharing.** The address bar holds the model, weights, images, layer and threshold: send it to a teammate.
Each figure downloads as PNG or SVG from its camera icon (format in the sidebar); the numbers as CSV or NPZ.
""")
