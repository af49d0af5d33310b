"""Data sets: the embedded digits and class folders (classification), digit-scenes, mask folders and ADE20K
(segmentation), COCO folders (detection); image listing and the unreadable-file rules they share."""
