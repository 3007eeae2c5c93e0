PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install test demo lint bench eval-demo eval-hd eval-hd-plain eval-ov eval-qwen train-demo train-hd train-ov train-qwen
DEMO_SEED ?= 2026
# Every method, at budgets whose prefill cost spans about 5% to 40% of the unpruned prefill (30% and 38% of the
# tokens take the methods that prune before layer 0 to the 24% and 31% costs the equal-cost comparison needs).
EVAL_METHODS ?= none,random,uniform,tome,vidcom2,fastvid,dycoke,dycoke-prefill,holitom,flashvid,fastv,pdrop,sparsevlm,stprune
EVAL_BUDGETS ?= 5%,10%,15%,25%,30%,38%

# torch first and pinned: a bare `torch` requirement would pull gigabytes of CUDA wheels on a CPU box.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"

# A sample ShapesQA clip, answered by the shipped model with SparseVLM keeping 25% of the visual tokens.
demo:
	@$(PYTHON) -c "import vidsparse.cli, torch" 2>/dev/null || $(MAKE) install
	$(PYTHON) -m vidsparse make-shapes demo --n 4 --seed $(DEMO_SEED)
	@line=$$(sed -n 1p demo/qa.jsonl); \
	question=$$(echo "$$line" | $(PYTHON) -c 'import json, sys; print(json.load(sys.stdin)["question"])'); \
	answer=$$(echo "$$line" | $(PYTHON) -c 'import json, sys; print(json.load(sys.stdin)["answer"])'); \
	echo "question: $$question   (the true answer: $$answer)"; \
	$(PYTHON) -m vidsparse ask demo/00000.mp4 "$$question" --model shapes-demo --method sparsevlm --budget 25% \
		--show-kept demo/kept.png

# Reproduce the shipped checkpoint (about 30 minutes on 2 CPU cores) and its EVAL.md.
train-demo:
	$(PYTHON) -m lab.train_demo --out vidsparse/shipped/shapes-videollava

# The LLaVA-OneVision yardstick model: the demo recipe (ShapesQA, tower then QA stage) on a tiny OneVision
# (SigLIP patch 4 -> 8 x 16 pooled tokens + newline, 4-layer Qwen2), and its EVAL.md. Resumable: the state
# is saved every 5 minutes and re-running the target goes on from it.
train-ov:
	$(PYTHON) -m lab.train_demo --family llava_onevision --out vidsparse/shipped/shapes-onevision --resume \
		--save-minutes 5

# The Qwen2.5-VL yardstick (64 visual tokens at 3-D positions; tower then QA stage, about 40 minutes on 2 CPU
# cores, resumable).
train-qwen:
	$(PYTHON) -m lab.train_demo --family qwen2_5_vl --out vidsparse/shipped/shapes-qwen --resume --save-minutes 5

# The real-geometry yardstick's model (ShapesQA-HD: 8 x 65 visual tokens, 8-layer decoder). Hours on 2 CPU
# cores; resumable: the state is saved every 10 minutes and re-running the target goes on from it.
# All cycles (the default) are the shipped model's recipe (U); HD_CYCLES=8 stops after the ninth cycle (recipe T),
# HD_CYCLES=7 after the eighth (recipe R), HD_CYCLES=6 after the seventh (recipe Q), HD_CYCLES=5 after the sixth (recipe P),
# HD_CYCLES=4 after the fifth (recipe O), HD_CYCLES=3 after the fourth (recipe N).
HD_CYCLES ?=
train-hd:
	$(PYTHON) -m lab.train_demo --yardstick hd --resume --save-minutes 10 $(if $(HD_CYCLES),--cycles $(HD_CYCLES))

# $(call evaluate,CLIPS,SEED AND KIND,MODEL,FULL,BUDGETS,SWEEP): the held-out clips CLIPS made from their seed,
# MODEL's accuracy with every token per question type (CLIPS/FULL), then every method at every budget (SWEEP).
define evaluate
	$(PYTHON) -m vidsparse make-shapes $(1) $(2)
	$(PYTHON) -m vidsparse batch $(1) --questions $(1)/qa.jsonl --out $(1)/$(4) \
		--model $(3) --method none --max-new-tokens 8
	$(PYTHON) -m vidsparse sweep $(1) --questions $(1)/qa.jsonl --model $(3) \
		--methods $(EVAL_METHODS) --budgets $(5) --repeats 1 --max-new-tokens 8 --out $(6)
endef
FAMILY_BUDGETS := 5%,10%,25%
# The held-out seeds: never trained or tuned on.
HELD_OUT := --n 500 --seed 424242
HD_HELD_OUT := --kind hd --n 500 --seed 434343

eval-demo:
	$(call evaluate,shapes-eval,$(HELD_OUT),shapes-demo,full.jsonl,$(EVAL_BUDGETS),docs/shapes-sweep)

# The same for the real-geometry yardstick (ShapesQA-HD, 520 visual tokens): its held-out seed, its model.
eval-hd:
	$(call evaluate,shapes-hd-eval,$(HD_HELD_OUT),shapes-hd,full.jsonl,$(EVAL_BUDGETS),docs/shapes-hd-sweep)

# Recipe N's HD model (trained on complete clips only, never in the pruned regime) on the same held-out clips.
eval-hd-plain:
	$(call evaluate,shapes-hd-eval,$(HD_HELD_OUT),shapes-hd-plain,full-plain.jsonl,$(EVAL_BUDGETS),docs/shapes-hd-plain-sweep)

# The LLaVA-OneVision yardstick on ShapesQA's held-out clips (every method at 5, 10 and 25% of its 128 tokens).
eval-ov:
	$(call evaluate,shapes-eval,$(HELD_OUT),shapes-ov,full-ov.jsonl,$(FAMILY_BUDGETS),docs/shapes-ov-sweep)

# The Qwen2.5-VL yardstick on the same held-out clips (every method at 5, 10 and 25% of its 64 tokens).
eval-qwen:
	$(call evaluate,shapes-eval,$(HELD_OUT),shapes-qwen,full-qwen.jsonl,$(FAMILY_BUDGETS),docs/shapes-qwen-sweep)

test:
	$(PYTHON) -m pytest tests

lint:
	$(PYTHON) -m ruff check vidsparse lab bench tests harness

bench:
	$(PYTHON) bench/prefill.py
	$(PYTHON) bench/families.py
	$(PYTHON) bench/end_to_end.py
	$(PYTHON) bench/batch.py
	$(PYTHON) bench/batch.py --model demo
	$(PYTHON) bench/ray_batch.py
