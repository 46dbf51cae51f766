import os
import warnings

# megatron-core warns on import that TransformerEngine/Apex are absent; that is the CPU setup.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
